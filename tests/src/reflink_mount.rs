//! An XFS file system with reflink (`mkfs.xfs -m reflink=1`) on a loop device, mounted at
//! a given directory for one test: what a `file` pool needs for snapshots and clones.
//! Unmounted and detached on drop, so also when the test fails. Needs root and xfsprogs.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A mounted reflink-capable XFS.
pub struct ReflinkMount {
    _image_dir: tempfile::TempDir,
    mountpoint: PathBuf,
    loop_device: String,
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl ReflinkMount {
    /// Make a 320 MiB (sparse) XFS and mount it at `mountpoint` (created if missing).
    pub fn at(mountpoint: &Path) -> ReflinkMount {
        let image_dir = tempfile::Builder::new()
            .prefix("tandem-xfs")
            .tempdir()
            .expect("temp dir");
        let image = image_dir.path().join("xfs.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(320 << 20))
            .expect("image file");
        std::fs::create_dir_all(mountpoint).expect("mountpoint");
        let loop_device = run(
            "losetup",
            &["--find", "--show", image.to_str().unwrap_or("")],
        );
        let mount = ReflinkMount {
            _image_dir: image_dir,
            mountpoint: mountpoint.to_path_buf(),
            loop_device,
        };
        run("mkfs.xfs", &["-q", "-m", "reflink=1", &mount.loop_device]);
        run(
            "mount",
            &[&mount.loop_device, mount.mountpoint.to_str().unwrap_or("")],
        );
        mount
    }
}

impl Drop for ReflinkMount {
    fn drop(&mut self) {
        // A process forked by another test thread may hold a descriptor of this file
        // system for a moment (until its exec): retry, then detach lazily.
        let umount = |lazy: bool| {
            let mut cmd = Command::new("umount");
            if lazy {
                cmd.arg("-l");
            }
            cmd.arg(&self.mountpoint)
                .status()
                .is_ok_and(|s| s.success())
        };
        if !(0..20).any(|_| {
            umount(false) || {
                std::thread::sleep(std::time::Duration::from_millis(50));
                false
            }
        }) {
            umount(true);
        }
        let _ = Command::new("losetup")
            .args(["-d", &self.loop_device])
            .status();
    }
}
