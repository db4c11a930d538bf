//! NDJSON files in a directory, one writer per process: rotation by size and by time with
//! names that sort by creation time, optional gzip of rotated files, keep-last-N, fsync on
//! close. A failed write is cut back off the file, so a retry never leaves half a batch.
//!
//! A writer holds an exclusive `flock` on its open file until the file is finished (synced,
//! and compressed when asked). That lock, not the pid in the name, is what tells `keep` a file
//! is still being written: it holds across pid namespaces (containers sharing a volume, where
//! every writer may be pid 1) and between two destinations of one process (locks belong to
//! open files, not to processes).

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use flate2::write::GzEncoder;
use flate2::Compression;

use super::{Outcome, WriteError, Writer};
use crate::config::LocalFilesConfig;
use crate::encode::encode_batch;
use crate::flock::{try_lock, HeldFile};
use crate::record::Record;

/// Bytes per write system call.
const WRITE_SLICE: usize = 256 << 10;

struct Current {
    file: HeldFile,
    path: PathBuf,
    bytes: u64,
    period: u64,
    inode: u64,
}

impl Current {
    /// False once someone removed or replaced our file: writes to the open handle would
    /// land in an unlinked inode and be lost without an error.
    fn still_ours(&self) -> bool {
        fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.inode)
    }
}

pub struct LocalFiles {
    cfg: LocalFilesConfig,
    dir: PathBuf,
    current: Option<Current>,
    seq: u32,
    buf: Vec<u8>,
}

fn io_error(what: &str, path: &Path, e: io::Error) -> WriteError {
    let message = format!("{what} {}: {e}", path.display());
    // Past the file size limit (RLIMIT_FSIZE, the file system's): smaller pieces, each in
    // a new file, may fit where the batch does not.
    if e.raw_os_error() == Some(libc::EFBIG) {
        WriteError::oversized(message)
    } else {
        WriteError::transient(message)
    }
}

impl LocalFiles {
    pub fn open(cfg: LocalFilesConfig) -> Result<Self, WriteError> {
        let dir = PathBuf::from(&cfg.directory);
        fs::create_dir_all(&dir).map_err(|e| io_error("cannot create directory", &dir, e))?;
        Ok(LocalFiles {
            cfg,
            dir,
            current: None,
            seq: 0,
            buf: Vec::with_capacity(1 << 20),
        })
    }

    fn period_now(&self) -> u64 {
        match self.cfg.rotate_seconds {
            0 => 0,
            secs => Utc::now().timestamp().max(0) as u64 / secs,
        }
    }

    fn new_file(&mut self) -> Result<Current, WriteError> {
        // Another writer's `keep` may list the new file before we lock it; it removes files
        // only under their lock. So once we hold the lock the file is either still there,
        // and safe, or gone; one whose lock stays taken we leave to the taker. Either way,
        // the next name.
        for _ in 0..8 {
            let (cur, lock) = self.create_file()?;
            match lock {
                Lock::Held if !cur.still_ours() => {}
                Lock::Busy => {
                    if cur.still_ours() {
                        let _ = fs::remove_file(&cur.path);
                    }
                }
                // Unsupported: a file system without locks, where `keep` removes no plain file.
                Lock::Held | Lock::Unsupported => return Ok(cur),
            }
        }
        Err(WriteError::transient(format!(
            "cannot create a file in {}: other writers kept taking the new ones",
            self.dir.display()
        )))
    }

    fn create_file(&mut self) -> Result<(Current, Lock), WriteError> {
        // The directory may have been removed under us (log cleanup jobs do that).
        fs::create_dir_all(&self.dir)
            .map_err(|e| io_error("cannot create directory", &self.dir, e))?;
        let stamp = Utc::now().format("%Y%m%dT%H%M%S%.6fZ");
        self.seq = self.seq.wrapping_add(1);
        let name = format!(
            "{}-{stamp}-{}-{:04}.ndjson",
            self.cfg.prefix,
            std::process::id(),
            self.seq
        );
        let path = self.dir.join(name);
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(|e| io_error("cannot create", &path, e))?;
        let meta = file
            .metadata()
            .map_err(|e| io_error("cannot stat", &path, e))?;
        let inode = meta.ino();
        let file = HeldFile::new(file, &meta);
        let lock = lock_writer_file(&file);
        let cur = Current {
            file,
            path,
            bytes: 0,
            period: self.period_now(),
            inode,
        };
        Ok((cur, lock))
    }

    fn rotate(&mut self) -> Result<(), WriteError> {
        let Some(cur) = self.current.take() else {
            return Ok(());
        };
        // A rotated file is final: make it durable before anyone compresses or ships it.
        cur.file
            .sync_all()
            .map_err(|e| io_error("cannot sync", &cur.path, e))?;
        // Still under our lock, so no other writer's `keep` takes the file half-compressed.
        if cur.bytes == 0 {
            let _ = fs::remove_file(&cur.path);
        } else if self.cfg.compress {
            gzip_file(&cur.path).map_err(|e| io_error("cannot compress", &cur.path, e))?;
        }
        drop(cur);
        self.prune();
        Ok(())
    }

    /// Keeps the newest `keep` finished files of this prefix; names sort by creation time.
    /// Other writers may share the directory (other processes, other containers, other
    /// destinations of this process): a plain file whose lock cannot be taken is still being
    /// written (or cannot be told), is not counted and is never removed: a removed open file
    /// would swallow its writer's next batches.
    fn prune(&self) {
        if self.cfg.keep == 0 {
            return;
        }
        let current = self.current.as_ref().map(|c| c.path.clone());
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| Some(p) != current.as_ref())
            .filter(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n.starts_with(&format!("{}-", self.cfg.prefix))
                        && (n.ends_with(".ndjson") || n.ends_with(".ndjson.gz"))
                })
            })
            .collect();
        files.sort();
        // An empty file (left by a write that failed, then was cut back) holds no log: it
        // is removed, and never counted among the files kept.
        files.retain(|p| {
            let empty = fs::metadata(p).is_ok_and(|m| m.len() == 0);
            if empty {
                if let Finished::Yes(_lock) = finished_file(p) {
                    let _ = fs::remove_file(p);
                }
            }
            !empty
        });
        let finished: Vec<&PathBuf> = files
            .iter()
            .filter(|p| matches!(finished_file(p), Finished::Yes(_)))
            .collect();
        let excess = finished.len().saturating_sub(self.cfg.keep);
        for old in &finished[..excess] {
            // Removed under its lock, taken again: a writer that met its new file's lock
            // taken here finds the file gone once it holds the lock, and takes another name.
            if let Finished::Yes(_lock) = finished_file(old) {
                let _ = fs::remove_file(old);
            }
        }
    }

    fn ensure_file(&mut self, incoming: u64) -> Result<(), WriteError> {
        if self.current.as_ref().is_some_and(|c| !c.still_ours()) {
            self.current = None;
        }
        let period = self.period_now();
        let needs_rotation = self.current.as_ref().is_some_and(|c| {
            c.period != period || (c.bytes > 0 && c.bytes + incoming > self.cfg.max_file_bytes)
        });
        if needs_rotation {
            self.rotate()?;
        }
        if self.current.is_none() {
            self.current = Some(self.new_file()?);
        }
        Ok(())
    }
}

/// Whether `keep` may count and remove a file.
enum Finished {
    /// Holds the file's lock (if it is a plain one) until dropped.
    Yes(Option<File>),
    /// Its writer holds the lock, or it cannot be told (unreadable, no locks here), or gone.
    No,
}

fn finished_file(path: &Path) -> Finished {
    // Compressed files are only ever renamed into place, complete.
    if path.extension().is_none_or(|e| e != "ndjson") {
        return Finished::Yes(None);
    }
    match File::open(path) {
        Ok(file) if matches!(try_lock(&file), Ok(true)) => Finished::Yes(Some(file)),
        _ => Finished::No,
    }
}

enum Lock {
    Held,
    /// Someone else holds it: a `keep` about to remove the file (it lists files it did not
    /// create, and may meet a new one before its writer locks it).
    Busy,
    /// The file system has no locks (the `keep` of every writer leaves its plain files alone).
    Unsupported,
}

/// Locks a writer's new file (let go of in forked children: see `crate::flock`).
fn lock_writer_file(file: &HeldFile) -> Lock {
    // A `keep` holds a lock for the moment it takes to remove the file; never wait without
    // end (a child forked in that moment would hold it for its lifetime).
    let mut lock = Lock::Busy;
    for _ in 0..50 {
        lock = match file.try_lock() {
            Ok(true) => Lock::Held,
            Ok(false) => Lock::Busy,
            Err(_) => Lock::Unsupported,
        };
        if !matches!(lock, Lock::Busy) {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    lock
}

fn gzip_file(path: &Path) -> io::Result<()> {
    let gz_path = path.with_extension("ndjson.gz");
    let tmp = path.with_extension("ndjson.gz.tmp");
    {
        let mut input = BufReader::new(File::open(path)?);
        let out = BufWriter::new(File::create(&tmp)?);
        let mut enc = GzEncoder::new(out, Compression::default());
        io::copy(&mut input, &mut enc)?;
        let out = enc.finish()?;
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    }
    fs::rename(&tmp, &gz_path)?;
    fs::remove_file(path)
}

impl Writer for LocalFiles {
    fn write_batch(
        &mut self,
        batch: &[Arc<Record>],
        _timeout: Duration,
    ) -> Result<Outcome, WriteError> {
        self.buf.clear();
        encode_batch(batch.iter().map(|r| &**r), &mut self.buf);
        self.ensure_file(self.buf.len() as u64)?;
        let cur = self.current.as_mut().expect("ensure_file opened a file");
        // In slices, with the application's threads let in between: one write of a 4 MB
        // batch keeps a core in the kernel for milliseconds.
        let written = self.buf.chunks(WRITE_SLICE).try_for_each(|slice| {
            crate::pipeline::let_application_run();
            cur.file.write_all(slice)
        });
        let written = written.and_then(|()| {
            if self.cfg.fsync {
                cur.file.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = written {
            // Cut the partial batch back off so the retry writes it exactly once.
            let _ = cur.file.set_len(cur.bytes);
            let err = io_error("cannot write", &cur.path, e);
            // A fresh file on the next attempt, in case this handle is what went bad; one
            // left empty goes (an outage would otherwise leave one per attempt).
            if cur.bytes == 0 {
                let _ = fs::remove_file(&cur.path);
            }
            self.current = None;
            return Err(err);
        }
        cur.bytes += self.buf.len() as u64;
        if self.buf.capacity() > 16 << 20 {
            self.buf = Vec::with_capacity(1 << 20);
        }
        Ok(Outcome::default())
    }

    fn idle(&mut self) {
        if self
            .current
            .as_ref()
            .is_some_and(|c| c.period != self.period_now())
        {
            let _ = self.rotate();
        }
    }

    fn close(&mut self) -> Result<(), WriteError> {
        if let Some(cur) = self.current.take() {
            cur.file
                .sync_all()
                .map_err(|e| io_error("cannot sync", &cur.path, e))?;
            if cur.bytes == 0 {
                let _ = fs::remove_file(&cur.path);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flock::testing::Child;
    use crate::record::Kind;
    use std::io::Read;
    use std::os::unix::io::AsRawFd;

    fn batch(n: usize) -> Vec<Arc<Record>> {
        (0..n)
            .map(|i| {
                Arc::new(
                    Record::new(i as i64, "INFO", 20, Kind::App, format!("message {i}"))
                        .finish(1024),
                )
            })
            .collect()
    }

    fn cfg(dir: &Path) -> LocalFilesConfig {
        LocalFilesConfig {
            directory: dir.to_string_lossy().into(),
            ..Default::default()
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    /// Ten batches of ten records through a writer that is then closed; the file names.
    fn ten_batches(cfg: LocalFilesConfig) -> Vec<String> {
        let dir = PathBuf::from(&cfg.directory);
        let mut w = LocalFiles::open(cfg).unwrap();
        for _ in 0..10 {
            w.write_batch(&batch(10), Duration::from_secs(1)).unwrap();
        }
        w.close().unwrap();
        names(&dir)
    }

    #[test]
    fn writes_lines_and_rotates_by_size_with_gzip_and_keep() {
        let _serial = crate::flock::testing::FORK_SERIAL.lock();
        let tmp = crate::scratch::ScratchDir::new().unwrap();
        let files = ten_batches(LocalFilesConfig {
            max_file_bytes: 2000,
            compress: true,
            keep: 3,
            ..cfg(tmp.path())
        });
        assert_eq!(files.len(), 4, "{files:?}");
        assert!(files[..3].iter().all(|n| n.ends_with(".ndjson.gz")));
        assert!(files[3].ends_with(".ndjson"));
        let mut text = String::new();
        flate2::read::GzDecoder::new(File::open(tmp.path().join(&files[0])).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text.lines().count(), 10);
        assert!(text
            .lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));
    }

    /// Whether a writer holds `path`: its lock cannot be taken.
    fn locked(path: &Path) -> bool {
        !try_lock(&File::open(path).unwrap()).unwrap()
    }

    #[test]
    fn keep_never_removes_another_writer_s_open_file_whatever_its_name_says() {
        let _serial = crate::flock::testing::FORK_SERIAL.lock();
        let tmp = crate::scratch::ScratchDir::new().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let me = std::process::id();
        // Older than anything ours. Held by another process: one named with pid 1 (a writer
        // in another container, pid 1 there), one named with our own pid (the same).
        let held_1 = "logsluice-20000101T000000.000000Z-1-0001.ndjson".to_string();
        let held_me = format!("logsluice-20000101T000000.500000Z-{me}-0001.ndjson");
        // Not held: left by writers that finished or died, whatever their pid is now.
        let left_1 = "logsluice-20000101T000001.000000Z-1-0002.ndjson".to_string();
        let left_dead = format!("logsluice-20000101T000002.000000Z-{dead}-0001.ndjson");
        for name in [&held_1, &held_me, &left_1, &left_dead] {
            fs::write(tmp.path().join(name), "{}\n").unwrap();
        }
        let holder = Child::holding(
            &[&tmp.path().join(&held_1), &tmp.path().join(&held_me)],
            &[],
        );
        let files = ten_batches(LocalFilesConfig {
            max_file_bytes: 2000,
            keep: 2,
            ..cfg(tmp.path())
        });
        drop(holder);
        assert!(
            files.contains(&held_1) && files.contains(&held_me),
            "{files:?}"
        );
        assert!(
            !files.contains(&left_1) && !files.contains(&left_dead),
            "{files:?}"
        );
        // Ours: two finished files and the last one, besides the other writer's two.
        assert_eq!(files.len(), 5, "{files:?}");
    }

    #[test]
    fn keep_never_removes_the_open_file_of_another_writer_in_this_process() {
        let _serial = crate::flock::testing::FORK_SERIAL.lock();
        let tmp = crate::scratch::ScratchDir::new().unwrap();
        let mut slow = LocalFiles::open(cfg(tmp.path())).unwrap();
        let mut fast = LocalFiles::open(LocalFilesConfig {
            max_file_bytes: 2000,
            keep: 1,
            compress: true,
            ..cfg(tmp.path())
        })
        .unwrap();
        for _ in 0..10 {
            slow.write_batch(&batch(1), Duration::from_secs(1)).unwrap();
            fast.write_batch(&batch(10), Duration::from_secs(1))
                .unwrap();
        }
        let slow_path = slow.current.as_ref().unwrap().path.clone();
        assert_eq!(
            slow.seq, 1,
            "the slow writer's file was taken and started again"
        );
        assert!(locked(&slow_path));
        slow.close().unwrap();
        fast.close().unwrap();
        assert!(!locked(&slow_path), "closed, finished, no longer locked");
        assert_eq!(fs::read_to_string(&slow_path).unwrap().lines().count(), 10);
        // The fast one's last compressed file and its last plain one, besides the slow one's.
        assert_eq!(names(tmp.path()).len(), 3, "{:?}", names(tmp.path()));
    }

    #[test]
    fn a_forked_child_does_not_keep_the_parent_s_file_locked() {
        let _serial = crate::flock::testing::FORK_SERIAL.lock();
        let tmp = crate::scratch::ScratchDir::new().unwrap();
        let mut w = LocalFiles::open(cfg(tmp.path())).unwrap();
        w.write_batch(&batch(1), Duration::from_secs(1)).unwrap();
        let cur = w.current.as_ref().unwrap();
        let (path, fd) = (cur.path.clone(), cur.file.as_raw_fd());
        // The child keeps the descriptor number, as a forked app keeps the parent's core.
        let child = Child::holding(&[], &[fd]);
        assert!(locked(&path));
        w.close().unwrap();
        assert!(
            !locked(&path),
            "the forked child still holds the finished file's lock"
        );
        drop(child);
    }

    #[test]
    fn time_rotation_starts_a_new_file() {
        let tmp = crate::scratch::ScratchDir::new().unwrap();
        let mut w = LocalFiles::open(cfg(tmp.path())).unwrap();
        w.write_batch(&batch(1), Duration::from_secs(1)).unwrap();
        w.current.as_mut().unwrap().period = 0;
        w.idle();
        w.write_batch(&batch(1), Duration::from_secs(1)).unwrap();
        w.close().unwrap();
        assert_eq!(names(tmp.path()).len(), 2);
    }
}
