//! Issue 2 acceptance: the lifecycle of a (not yet replicated) volume on a `file` pool,
//! driven through the real `tandem` CLI against a real `tandemd`, with the backing files
//! and definitions checked on disk. Needs `cargo build --workspace --bins` first.

use std::fs;
use std::path::Path;

use tandem_tests::TandemNode;

const MIB: u64 = 1 << 20;

fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

fn volume_names(node: &TandemNode) -> Vec<String> {
    node.tandem(&["volume", "list", "--json"])
        .ok()
        .json()
        .as_array()
        .expect("volume list --json is an array")
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect()
}

/// A one-line `tandem: ...` message.
fn assert_one_line_error(stderr: &str, expected: &str) {
    let stderr = stderr.trim_end();
    assert!(!stderr.contains('\n'), "error is not one line: {stderr:?}");
    assert!(stderr.starts_with("tandem: "), "{stderr:?}");
    assert!(
        stderr.contains(expected),
        "expected {expected:?} in {stderr:?}"
    );
}

#[test]
fn create_resize_list_restart_delete() {
    let mut node = TandemNode::start_new();
    let image = node.images().join("v1.img");

    let created = node
        .tandem(&["volume", "create", "v1", "--size", "64M", "--json"])
        .ok()
        .json();
    assert_eq!(created["name"], "v1");
    assert_eq!(created["pool"], "files");
    assert_eq!(created["size_bytes"], 64 * MIB);
    assert_eq!(fs::metadata(&image).unwrap().len(), 64 * MIB);
    assert!(node.definitions().join("v1.json").exists());

    let resized = node
        .tandem(&["volume", "resize", "v1", "--size", "128M", "--json"])
        .ok()
        .json();
    assert_eq!(resized["size_bytes"], 128 * MIB);
    assert_eq!(fs::metadata(&image).unwrap().len(), 128 * MIB);

    let listed = node.tandem(&["volume", "list", "--json"]).ok().json();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["name"], "v1");
    assert_eq!(listed[0]["size_bytes"], 128 * MIB);
    assert_eq!(listed[0]["pool"], "files");
    assert_eq!(listed[0]["state"], "ok");
    assert_eq!(listed[0]["path"], image.to_str().unwrap());

    // The human table has a header and the volume.
    let table = node.tandem(&["volume", "list"]).ok().stdout;
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains("v1") && table.contains("128 MiB"), "{table}");

    // A clean restart and a crash (stale socket left behind) both reload the definition.
    assert!(node.stop().success());
    node.start();
    node.crash();
    assert!(node.socket().exists(), "a crash leaves the socket file");
    node.start();
    let shown = node.tandem(&["volume", "show", "v1", "--json"]).ok().json();
    assert_eq!(shown["size_bytes"], 128 * MIB);
    assert_eq!(shown["pool"], "files");

    let pools = node.tandem(&["pool", "list", "--json"]).ok().json();
    let pool = &pools.as_array().unwrap()[0];
    assert_eq!(pool["name"], "files");
    assert_eq!(pool["backend"], "file");
    assert_eq!(pool["volumes"], 1);
    assert_eq!(pool["provisioned_bytes"], 128 * MIB);
    let total = pool["total_bytes"].as_u64().unwrap();
    assert!(total > 0 && pool["free_bytes"].as_u64().unwrap() <= total);

    let info = node.tandem(&["node", "info", "--json"]).ok().json();
    assert_eq!(info["name"], "hv1");
    assert_eq!(info["pools"][0], "files");

    node.tandem(&["volume", "delete", "v1"]).ok();
    assert!(!image.exists(), "backing file removed");
    assert!(
        !node.definitions().join("v1.json").exists(),
        "definition removed"
    );
    assert!(volume_names(&node).is_empty());

    // After a restart the deleted volume stays deleted.
    assert!(node.stop().success());
    node.start();
    assert!(volume_names(&node).is_empty());
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let node = TandemNode::start_new();
    node.tandem(&["volume", "create", "keep", "--size", "1M"])
        .ok();
    let images_before = file_names(&node.images());
    let definitions_before = file_names(&node.definitions());
    assert_eq!(images_before, vec!["keep.img"]);
    assert_eq!(definitions_before, vec!["keep.json"]);

    let long_name = "a".repeat(65);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["volume", "create", "keep", "--size", "1M"],
            "volume 'keep' already exists",
        ),
        (
            vec!["volume", "create", "v2", "--size", "1M", "--pool", "nvme"],
            "pool 'nvme' does not exist (configured: 'files')",
        ),
        (
            vec!["volume", "create", "a/b", "--size", "1M"],
            "contains '/'",
        ),
        (
            vec!["volume", "create", "..", "--size", "1M"],
            "'.' and '..' are reserved",
        ),
        (
            vec!["volume", "create", ".", "--size", "1M"],
            "'.' and '..' are reserved",
        ),
        (
            vec!["volume", "create", "--size", "1M", "--", "-x"],
            "must not start with '-'",
        ),
        (
            vec!["volume", "create", "a b", "--size", "1M"],
            "contains ' '",
        ),
        (
            vec!["volume", "create", &long_name, "--size", "1M"],
            "longer than 64",
        ),
        (
            vec!["volume", "create", "v2", "--size", "0"],
            "size must be greater than 0",
        ),
        (
            vec!["volume", "create", "v2", "--size", "ten"],
            "is not a whole number",
        ),
        (
            vec!["volume", "create", "v2", "--size", "10X"],
            "unknown size suffix 'X'",
        ),
        (
            vec!["volume", "create", "v2", "--size", "1000T"],
            "pool 'files' has ",
        ),
        (
            vec!["volume", "resize", "keep", "--size", "4K"],
            "shrinking to 4 KiB is not supported",
        ),
        (
            vec!["volume", "resize", "nope", "--size", "4M"],
            "volume 'nope' does not exist",
        ),
        (
            vec!["volume", "resize", "keep", "--size", "1000T"],
            "volume needs ",
        ),
        (
            vec!["volume", "show", "nope"],
            "volume 'nope' does not exist",
        ),
        (
            vec!["volume", "delete", "nope"],
            "volume 'nope' does not exist",
        ),
        (vec!["volume", "delete", ".."], "'.' and '..' are reserved"),
    ];
    for (args, expected) in cases {
        let stderr = node.tandem(&args).failed();
        assert_one_line_error(&stderr, expected);
        assert_eq!(file_names(&node.images()), images_before, "after {args:?}");
        assert_eq!(
            file_names(&node.definitions()),
            definitions_before,
            "after {args:?}"
        );
    }
    // The beyond-the-pool message says how much is free and how much was asked for.
    let stderr = node
        .tandem(&["volume", "create", "v2", "--size", "1000T"])
        .failed();
    assert!(stderr.contains("free, volume needs 1000 TiB"), "{stderr}");
    assert_eq!(
        fs::metadata(node.images().join("keep.img")).unwrap().len(),
        MIB
    );
    assert_eq!(volume_names(&node), vec!["keep"]);
}

#[test]
fn concurrent_creates_of_one_name_have_exactly_one_winner() {
    let node = TandemNode::start_new();
    let children: Vec<_> = (0..8)
        .map(|_| {
            node.tandem_command(&["volume", "create", "race", "--size", "16M"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let winners = outputs.iter().filter(|o| o.status.success()).count();
    assert_eq!(winners, 1, "exactly one create wins");
    for loser in outputs.iter().filter(|o| !o.status.success()) {
        let stderr = String::from_utf8_lossy(&loser.stderr);
        assert_one_line_error(&stderr, "volume 'race' already exists");
    }
    assert_eq!(file_names(&node.images()), vec!["race.img"]);
    assert_eq!(file_names(&node.definitions()), vec!["race.json"]);
    assert_eq!(
        fs::metadata(node.images().join("race.img")).unwrap().len(),
        16 * MIB
    );
}

#[test]
fn sigterm_stops_cleanly_and_removes_the_socket() {
    let mut node = TandemNode::start_new();
    assert!(node.socket().exists());
    let status = node.stop();
    assert!(
        status.success(),
        "tandemd exit status {status}:\n{}",
        node.log()
    );
    assert!(!node.socket().exists(), "socket removed on SIGTERM");
    assert!(node.log().contains("SIGTERM received"), "{}", node.log());
    let stderr = node.tandem(&["volume", "list"]).failed();
    assert_one_line_error(
        &stderr,
        &format!(
            "cannot reach tandemd at {} (is it running?)",
            node.socket().display()
        ),
    );
}

#[test]
fn startup_reports_orphans_and_missing_storage_without_deleting() {
    let mut node = TandemNode::start_new();
    node.tandem(&["volume", "create", "gone", "--size", "1M"])
        .ok();
    node.tandem(&["volume", "create", "grown", "--size", "1M"])
        .ok();
    node.stop();
    // A resize interrupted after the storage grew but before the definition was rewritten.
    fs::OpenOptions::new()
        .write(true)
        .open(node.images().join("grown.img"))
        .unwrap()
        .set_len(2 * MIB)
        .unwrap();
    // Storage without a definition (an interrupted create) and a definition whose storage
    // vanished behind Tandem's back.
    fs::write(node.images().join("orphan.img"), b"precious").unwrap();
    fs::remove_file(node.images().join("gone.img")).unwrap();
    node.start();
    let log = node.log();
    assert!(log.contains("storage without a volume definition"), "{log}");
    assert!(log.contains("volume's storage was not found"), "{log}");
    assert_eq!(
        fs::read(node.images().join("orphan.img")).unwrap(),
        b"precious"
    );
    let shown = node
        .tandem(&["volume", "show", "gone", "--json"])
        .ok()
        .json();
    assert_eq!(shown["state"], "missing");
    assert!(log.contains("completing the resize"), "{log}");
    let grown = node
        .tandem(&["volume", "show", "grown", "--json"])
        .ok()
        .json();
    assert_eq!(grown["size_bytes"], 2 * MIB);
    let definition = fs::read_to_string(node.definitions().join("grown.json")).unwrap();
    assert!(
        definition.contains(&format!("\"size_bytes\": {}", 2 * MIB)),
        "{definition}"
    );
    // The orphan's name is taken by storage: creating it is refused, the data stays.
    let stderr = node
        .tandem(&["volume", "create", "orphan", "--size", "1M"])
        .failed();
    assert_one_line_error(&stderr, "already holds storage named 'orphan'");
    assert_eq!(
        fs::read(node.images().join("orphan.img")).unwrap(),
        b"precious"
    );
    assert!(!node.definitions().join("orphan.json").exists());
    // A missing volume can still be deleted.
    node.tandem(&["volume", "delete", "gone"]).ok();
    assert_eq!(volume_names(&node), vec!["grown"]);
}

#[test]
fn config_errors_name_the_file_and_key() {
    let node = TandemNode::new();
    let config = node.config();
    let text = fs::read_to_string(&config)
        .unwrap()
        .replace("backend = \"file\"", "backend = \"zfs\"");
    fs::write(&config, text).unwrap();
    let out = std::process::Command::new(tandem_tests::bin("tandemd"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = format!(
        "{}: pools[0].backend: unknown backend 'zfs' (expected 'file' or 'lvm-thin')",
        config.display()
    );
    assert!(stderr.contains(&expected), "{stderr}");
    // The CLI reads the same file (through TANDEM_CONFIG here) and says the same.
    let out = std::process::Command::new(tandem_tests::bin("tandem"))
        .args(["volume", "list"])
        .env("TANDEM_CONFIG", &config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_one_line_error(&String::from_utf8_lossy(&out.stderr), &expected);
}

#[test]
fn the_control_api_refuses_malformed_requests_and_keeps_serving() {
    use std::io::{BufRead, BufReader, Write};
    let node = TandemNode::start_new();
    let stream = std::os::unix::net::UnixStream::connect(node.socket()).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut ask = |line: &str| -> serde_json::Value {
        // The daemon closes after answering an oversized line, which may cut our write
        // short (EPIPE); its answer is still there to read.
        let _ = writer
            .write_all(line.as_bytes())
            .and_then(|()| writer.write_all(b"\n"));
        let mut answer = String::new();
        reader.read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap()
    };
    let answer = ask("not json");
    assert_eq!(answer["status"], "error");
    assert_eq!(answer["error"]["kind"], "bad_request");
    let answer = ask(r#"{"request":"format_all_disks"}"#);
    assert_eq!(answer["error"]["kind"], "bad_request");
    // The same connection still works, and errors carry a stable kind.
    let answer = ask(r#"{"request":"volume_create","name":"v1","size_bytes":4096}"#);
    assert_eq!(answer["status"], "ok", "{answer}");
    assert_eq!(answer["result"]["type"], "volume");
    assert_eq!(answer["result"]["volume"]["size_bytes"], 4096);
    let answer = ask(r#"{"request":"volume_create","name":"v1","size_bytes":4096}"#);
    assert_eq!(answer["error"]["kind"], "already_exists");
    let answer = ask(r#"{"request":"volume_show","name":"nope"}"#);
    assert_eq!(answer["error"]["kind"], "not_found");
    let answer = ask(r#"{"request":"volume_list"}"#);
    assert_eq!(answer["result"]["volumes"][0]["name"], "v1");
    // A request larger than 1 MiB is answered with an error and the connection closed.
    let huge = format!(
        r#"{{"request":"volume_show","name":"{}"}}"#,
        "x".repeat(2 << 20)
    );
    let answer = ask(&huge);
    assert_eq!(answer["error"]["kind"], "bad_request");
    // The daemon is still healthy for other clients.
    assert_eq!(volume_names(&node), vec!["v1"]);
}
