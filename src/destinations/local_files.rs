//! NDJSON files in a directory, one writer per process: rotation by size and by time with
//! names that sort by creation time, optional gzip of rotated files, keep-last-N, fsync on
//! close. A failed write is cut back off the file, so a retry never leaves half a batch.

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
use crate::record::Record;

/// Bytes per write system call.
const WRITE_SLICE: usize = 256 << 10;

struct Current {
    file: File,
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
    WriteError::transient(format!("{what} {}: {e}", path.display()))
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
        let inode = file
            .metadata()
            .map_err(|e| io_error("cannot stat", &path, e))?
            .ino();
        Ok(Current {
            file,
            path,
            bytes: 0,
            period: self.period_now(),
            inode,
        })
    }

    fn rotate(&mut self) -> Result<(), WriteError> {
        let Some(cur) = self.current.take() else {
            return Ok(());
        };
        // A rotated file is final: make it durable before anyone compresses or ships it.
        cur.file
            .sync_all()
            .map_err(|e| io_error("cannot sync", &cur.path, e))?;
        drop(cur.file);
        if cur.bytes == 0 {
            let _ = fs::remove_file(&cur.path);
        } else if self.cfg.compress {
            gzip_file(&cur.path).map_err(|e| io_error("cannot compress", &cur.path, e))?;
        }
        self.prune();
        Ok(())
    }

    /// Keeps the newest `keep` finished files of this prefix; names sort by creation time.
    /// Other processes may write to the same directory: the newest plain file of each live
    /// process is its open file, never finished, never removed (a removed open file would
    /// swallow that process's next writes).
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
        // Newest first: the first plain file met of a live process is its open one.
        let mut settled = std::collections::HashSet::new();
        let mut finished: Vec<&PathBuf> = files
            .iter()
            .rev()
            .filter(|p| {
                let plain = p.extension().is_some_and(|e| e == "ndjson");
                let open = match writer_pid(p) {
                    Some(pid) if plain && pid != std::process::id() && settled.insert(pid) => {
                        is_alive(pid)
                    }
                    _ => false,
                };
                !open
            })
            .collect();
        finished.reverse();
        let excess = finished.len().saturating_sub(self.cfg.keep);
        for old in &finished[..excess] {
            let _ = fs::remove_file(old);
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

/// The process that wrote a file: names are `{prefix}-{time}-{pid}-{seq}.ndjson[.gz]`.
fn writer_pid(path: &Path) -> Option<u32> {
    let name = path.file_name()?.to_str()?;
    let stem = name.strip_suffix(".gz").unwrap_or(name);
    let stem = stem.strip_suffix(".ndjson")?;
    let mut parts = stem.rsplitn(3, '-');
    let _seq = parts.next()?;
    parts.next()?.parse().ok()
}

fn is_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists; nothing is sent.
    let r = unsafe { libc::kill(pid, 0) };
    // EPERM: it exists, under another user.
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
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
        if let Err(e) = written {
            // Cut the partial batch back off so the retry writes it exactly once.
            let _ = cur.file.set_len(cur.bytes);
            let err = io_error("cannot write", &cur.path, e);
            // A fresh file on the next attempt, in case this handle is what went bad.
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
    use crate::record::Kind;
    use std::io::Read;

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

    #[test]
    fn keep_never_removes_another_live_process_open_file() {
        let tmp = crate::scratch::ScratchDir::new().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        // Older than anything ours: a long-lived process (pid 1) and one that has exited.
        let live = "logsluice-20000101T000000.000000Z-1-0001.ndjson";
        let gone = format!("logsluice-20000101T000001.000000Z-{dead}-0001.ndjson");
        for name in [live, gone.as_str()] {
            fs::write(tmp.path().join(name), "{}\n").unwrap();
        }
        let files = ten_batches(LocalFilesConfig {
            max_file_bytes: 2000,
            keep: 2,
            ..cfg(tmp.path())
        });
        assert!(files.iter().any(|n| n == live), "{files:?}");
        assert!(!files.contains(&gone), "{files:?}");
        // Ours: two finished files and the last one, besides the live process's open one.
        assert_eq!(files.len(), 4, "{files:?}");
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
