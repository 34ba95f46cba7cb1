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
        let _ = Command::new("umount").arg(&self.mountpoint).status();
        let _ = Command::new("losetup")
            .args(["-d", &self.loop_device])
            .status();
    }
}
