//! Exclusive `flock`s on files, and keeping them out of forked children.
//!
//! A lock belongs to an open file description and goes with its last descriptor. A forked
//! child gets copies of the parent's descriptors that it never uses (the parent's core is
//! left alone there) but that would hold the parent's locks for as long as the child lives:
//! a LocalFiles writer's file would stay uncounted by `keep`, a spill file claimed for
//! replay would stay claimed after the parent let go of it. Files opened as [`HeldFile`]
//! are let go of in the child right after the fork.

use std::fs::{File, Metadata};
use std::io;
use std::ops::{Deref, DerefMut};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;

/// Tries to take the exclusive lock on `file` without waiting: false when another open
/// file description holds it (in this process or any other).
pub fn try_lock(file: &File) -> io::Result<bool> {
    loop {
        // SAFETY: the descriptor is open for as long as `file` is borrowed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => return Ok(false),
            _ => return Err(e),
        }
    }
}

/// A file whose locks a forked child lets go of.
pub struct HeldFile {
    file: File,
}

impl HeldFile {
    /// Known before any lock is taken: a fork between the two lets go of the child's copy.
    /// `meta` is the file's own (the callers need it too; read once).
    pub fn new(file: File, meta: &Metadata) -> HeldFile {
        held::add(file.as_raw_fd(), meta.ino());
        HeldFile { file }
    }

    pub fn try_lock(&self) -> io::Result<bool> {
        try_lock(&self.file)
    }
}

impl Drop for HeldFile {
    fn drop(&mut self) {
        // Before the descriptor closes, so a fork never lets go of a number reused since.
        held::remove(self.file.as_raw_fd());
    }
}

/// Written through, for a `BufWriter` around it.
impl io::Write for HeldFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Deref for HeldFile {
    type Target = File;
    fn deref(&self) -> &File {
        &self.file
    }
}

impl DerefMut for HeldFile {
    fn deref_mut(&mut self) -> &mut File {
        &mut self.file
    }
}

/// The descriptors of this process's held files, let go of in a forked child by pointing
/// them at /dev/null.
mod held {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Once;

    /// A descriptor and the low half of its inode, checked before it is replaced; more
    /// files than slots are only left locked in children.
    const SLOTS: usize = 64;
    const EMPTY: u64 = u64::MAX;
    static FDS: [AtomicU64; SLOTS] = [const { AtomicU64::new(EMPTY) }; SLOTS];
    static ATFORK: Once = Once::new();

    fn pack(fd: i32, inode: u64) -> u64 {
        (u64::from(fd as u32) << 32) | (inode & 0xffff_ffff)
    }

    pub(super) fn add(fd: i32, inode: u64) {
        ATFORK.call_once(|| {
            // SAFETY: registers a handler that only makes async-signal-safe calls.
            unsafe { libc::pthread_atfork(None, None, Some(let_go_in_child)) };
        });
        let entry = pack(fd, inode);
        let _ = FDS.iter().any(|slot| {
            slot.compare_exchange(EMPTY, entry, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        });
    }

    pub(super) fn remove(fd: i32) {
        for slot in &FDS {
            let entry = slot.load(Ordering::SeqCst);
            if entry != EMPTY && (entry >> 32) as u32 == fd as u32 {
                let _ = slot.compare_exchange(entry, EMPTY, Ordering::SeqCst, Ordering::SeqCst);
            }
        }
    }

    extern "C" fn let_go_in_child() {
        let mut null = -1;
        for slot in &FDS {
            let entry = slot.swap(EMPTY, Ordering::SeqCst);
            if entry == EMPTY {
                continue;
            }
            let fd = (entry >> 32) as u32 as i32;
            // SAFETY: fstat, open, dup2, fcntl and close are async-signal-safe; `st` is
            // plain data written by fstat.
            unsafe {
                let mut st: libc::stat = std::mem::zeroed();
                if libc::fstat(fd, &mut st) != 0
                    || st.st_ino as u64 & 0xffff_ffff != entry & 0xffff_ffff
                {
                    continue;
                }
                if null < 0 {
                    null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                    if null < 0 {
                        return;
                    }
                }
                // The number stays open (the parent's core, copied, still owns it); the
                // parent's file and its lock are let go.
                if libc::dup2(null, fd) >= 0 {
                    libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                }
            }
        }
        if null >= 0 {
            // SAFETY: our own descriptor, opened above.
            unsafe { libc::close(null) };
        }
    }
}

/// For tests that fork.
#[cfg(test)]
pub mod testing {
    /// Tests that fork, or that count locks, take this: a child forked by one test holds
    /// copies of every descriptor open at that moment (until it exits), the locks of other
    /// tests' plain files too.
    pub static FORK_SERIAL: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

    /// A forked child that lives until dropped.
    pub struct Child {
        pid: libc::pid_t,
        release: i32,
    }

    impl Child {
        /// A child that keeps whatever it inherited. Returns once the child runs: its fork
        /// handlers are done.
        pub fn idle() -> Child {
            Child::fork(|_| true)
        }

        /// Like a process of another writer: only `keep_fds` of what it inherited stay
        /// open, and `paths` are opened and locked there. Returns once they are.
        pub fn holding(paths: &[&std::path::Path], keep_fds: &[i32]) -> Child {
            let paths: Vec<std::ffi::CString> = paths
                .iter()
                .map(|p| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap())
                .collect();
            Child::fork(|pipes| {
                // SAFETY: system calls on descriptors and paths made before the fork.
                unsafe {
                    for fd in 3..4096 {
                        if !pipes.contains(&fd) && !keep_fds.contains(&fd) {
                            libc::close(fd);
                        }
                    }
                    paths.iter().all(|path| {
                        let fd = libc::open(path.as_ptr(), libc::O_RDONLY);
                        fd >= 0 && libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) == 0
                    })
                }
            })
        }

        /// `in_child` runs in the child, which must not allocate (another thread may have
        /// held the allocator's lock at the fork): it is given the two pipe ends the child
        /// uses, and the child exits at once if it returns false.
        fn fork(in_child: impl FnOnce(&[i32; 2]) -> bool) -> Child {
            let (mut ready, mut release) = ([0; 2], [0; 2]);
            // SAFETY: the child only runs `in_child`, reads and writes pipes and calls _exit.
            unsafe {
                // Close-on-exec: a process another test spawns meanwhile must not keep the
                // release pipe open.
                assert_eq!(libc::pipe2(ready.as_mut_ptr(), libc::O_CLOEXEC), 0);
                assert_eq!(libc::pipe2(release.as_mut_ptr(), libc::O_CLOEXEC), 0);
                let pid = libc::fork();
                assert!(pid >= 0);
                if pid == 0 {
                    // Its copy of the write end would keep the read below from ever ending.
                    libc::close(release[1]);
                    if !in_child(&[ready[1], release[0]]) {
                        libc::_exit(1);
                    }
                    libc::write(ready[1], b"r".as_ptr().cast(), 1);
                    let mut byte = 0u8;
                    libc::read(release[0], (&raw mut byte).cast(), 1);
                    libc::_exit(0);
                }
                libc::close(ready[1]);
                libc::close(release[0]);
                let mut byte = 0u8;
                let got = libc::read(ready[0], (&raw mut byte).cast(), 1);
                libc::close(ready[0]);
                let child = Child {
                    pid,
                    release: release[1],
                };
                assert_eq!(got, 1, "the child failed");
                child
            }
        }
    }

    impl Drop for Child {
        fn drop(&mut self) {
            // SAFETY: our pipe end and our child.
            unsafe {
                libc::close(self.release);
                libc::waitpid(self.pid, std::ptr::null_mut(), 0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{Child, FORK_SERIAL};
    use super::*;

    #[test]
    fn a_forked_child_does_not_keep_a_held_file_locked() {
        let _serial = FORK_SERIAL.lock();
        let tmp = crate::scratch::ScratchDir::new().unwrap();
        let (held, plain) = (tmp.path().join("held"), tmp.path().join("plain"));
        for p in [&held, &plain] {
            std::fs::write(p, b"x").unwrap();
        }
        let file = File::open(&held).unwrap();
        let meta = file.metadata().unwrap();
        let held_file = HeldFile::new(file, &meta);
        let plain_file = File::open(&plain).unwrap();
        assert!(held_file.try_lock().unwrap() && try_lock(&plain_file).unwrap());
        let child = Child::idle();
        drop((held_file, plain_file));
        // The parent let go of both; the child still holds the plain file's copy.
        assert!(try_lock(&File::open(&held).unwrap()).unwrap());
        assert!(!try_lock(&File::open(&plain).unwrap()).unwrap());
        drop(child);
        assert!(try_lock(&File::open(&plain).unwrap()).unwrap());
    }
}
