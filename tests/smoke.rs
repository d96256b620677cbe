//! The mount comes up, serves a file both ways, and goes down cleanly with `grainfs umount`.

mod common;

use common::Mount;

#[test]
fn mount_read_write_unmount() {
    let m = Mount::with_setup(|b| std::fs::write(b.join("a.txt"), b"hello").unwrap(), None);
    assert_eq!(std::fs::read(m.path().join("a.txt")).unwrap(), b"hello");
    std::fs::write(m.path().join("b.txt"), b"world").unwrap();
    assert_eq!(std::fs::read(m.backing().join("b.txt")).unwrap(), b"world");
    // The store is in the backing dir but neither listed nor reachable through the mount.
    assert!(m.backing().join(".grainfs").is_dir());
    let names: Vec<_> = std::fs::read_dir(m.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(!m.path().join(".grainfs").exists());
    let status = m.unmount();
    assert!(status.success(), "daemon exit status {status}");
}
