//! The spill directory: records a store could not take before `close` are written here, one
//! file per destination and closing process, and delivered by the next start that names
//! the same directory. Files are NDJSON (the encoder's format, so a person can read them
//! too), written under a temporary name, fsynced and renamed into place.
//!
//! A file is claimed by the process that replays it: it holds an exclusive `flock` on the
//! file and renames it to `.claimed`, so two processes starting together never replay one
//! file twice, and a claim whose process died (its lock went with it) is taken over. The
//! claimed file is deleted once its records are settled; a process closing mid-replay
//! renames it back with the offset reached, so nothing is read twice.

mod decode;
mod replay;
mod write;

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

pub use decode::decode_line;
pub use replay::Replay;
pub use write::SpillWriter;

use crate::config::{DestinationSpec, Target};
use crate::flock::{try_lock, HeldFile};

const READY: &str = ".spill";
const CLAIMED: &str = ".claimed";
const PARTIAL: &str = ".tmp";

/// One spill directory as a core uses it: its bound is shared by the destinations
/// spilling at the same close.
pub struct SpillDir {
    path: PathBuf,
    max_bytes: u64,
    /// What the directory held when the first destination began to spill.
    base: OnceLock<u64>,
    /// Bytes this process has spilled since.
    added: AtomicU64,
}

impl SpillDir {
    pub fn new(path: &str, max_bytes: u64) -> SpillDir {
        SpillDir {
            path: PathBuf::from(path),
            max_bytes,
            base: OnceLock::new(),
            added: AtomicU64::new(0),
        }
    }

    /// Takes `n` bytes of the directory's bound, or says there is no room. Approximate
    /// across processes closing at the same moment: each sees what the others had renamed
    /// into place when it began.
    fn reserve(&self, n: u64) -> bool {
        let base = *self.base.get_or_init(|| self.usage());
        let before = self.added.fetch_add(n, Ordering::SeqCst);
        if base + before + n > self.max_bytes {
            self.added.fetch_sub(n, Ordering::SeqCst);
            return false;
        }
        true
    }

    fn usage(&self) -> u64 {
        let Ok(entries) = std::fs::read_dir(&self.path) else {
            return 0;
        };
        entries
            .flatten()
            .filter(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.ends_with(READY) || name.ends_with(CLAIMED)
            })
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    }

    /// The files waiting for the destination `key` (ready, or claimed by a process that
    /// may have died), oldest first.
    fn candidates(&self, key: &str) -> Vec<String> {
        let prefix = format!("{key}.");
        let mut names: Vec<String> = std::fs::read_dir(&self.path)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.starts_with(&prefix) && (n.ends_with(READY) || n.ends_with(CLAIMED)))
            .collect();
        // The stem after the key starts with a zero-padded time: names sort by age.
        names.sort();
        names
    }

    /// Whether any file waits for one of these destinations (a cheap listing, no claim).
    pub fn has_waiting(&self, keys: &[String]) -> bool {
        keys.iter().any(|k| !self.candidates(k).is_empty())
    }

    /// Claims every file waiting for `key` that no live process holds.
    pub fn claim(&self, key: &str) -> Vec<Claimed> {
        self.sweep_partial(key);
        self.candidates(key)
            .into_iter()
            .filter_map(|name| self.claim_one(&name))
            .collect()
    }

    /// Deletes spill files a process began and never finished (it died mid-close): no
    /// lock on them, and untouched for a while (a live writer locks its file right after
    /// creating it and writes it within `close`'s grace).
    fn sweep_partial(&self, key: &str) {
        let prefix = format!("{key}.");
        let names = std::fs::read_dir(&self.path)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.starts_with(&prefix) && n.ends_with(PARTIAL));
        for name in names {
            let path = self.path.join(name);
            let Ok(file) = File::open(&path) else {
                continue;
            };
            let stale = file
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() > PARTIAL_STALE);
            if stale && try_lock(&file).unwrap_or(false) {
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    fn claim_one(&self, name: &str) -> Option<Claimed> {
        let path = self.path.join(name);
        let file = File::open(&path).ok()?;
        let held = file.metadata().ok()?;
        let file = HeldFile::new(file, &held);
        if !file.try_lock().unwrap_or(false) {
            return None; // a live process replays it
        }
        // The lock was free, but the name may have moved on meanwhile (claimed and
        // finished by another process): only the file the name still points to counts.
        let named = std::fs::metadata(&path).ok()?;
        if (held.dev(), held.ino()) != (named.dev(), named.ino()) {
            return None;
        }
        let (stem, offset) = parse_name(name)?;
        let claimed = self.path.join(file_name(&stem, offset, CLAIMED));
        if claimed != path {
            std::fs::rename(&path, &claimed).ok()?;
        }
        Some(Claimed {
            path: claimed,
            file,
            stem,
            start: offset,
            size: held.len(),
        })
    }

    /// A fresh stem for a file this process writes now: sorts after older ones.
    fn new_stem(&self, key: &str) -> String {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!(
            "{key}.{nanos:020}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        )
    }

    fn sync(&self) {
        if let Ok(dir) = File::open(&self.path) {
            let _ = dir.sync_all();
        }
    }
}

/// A spill file this process holds (its lock lives as long as `file`, and is let go of in
/// forked children).
pub struct Claimed {
    path: PathBuf,
    file: HeldFile,
    stem: String,
    /// Where replay starts: the offset a process closing mid-replay had reached.
    start: u64,
    size: u64,
}

impl Claimed {
    /// Hands the file back, to be replayed from `offset` by the next start; deletes it when
    /// nothing is left.
    fn release(self, dir: &SpillDir, offset: u64) {
        if offset >= self.size {
            let _ = std::fs::remove_file(&self.path);
        } else {
            let ready = dir.path.join(file_name(&self.stem, offset, READY));
            let _ = std::fs::rename(&self.path, ready);
        }
        drop(self.file);
    }
}

/// How long an unfinished spill file must lie untouched before it counts as abandoned.
const PARTIAL_STALE: std::time::Duration = std::time::Duration::from_secs(120);

fn file_name(stem: &str, offset: u64, suffix: &str) -> String {
    if offset == 0 {
        format!("{stem}{suffix}")
    } else {
        format!("{stem}.at{offset}{suffix}")
    }
}

/// The stem and resume offset of a ready or claimed file's name.
fn parse_name(name: &str) -> Option<(String, u64)> {
    let rest = name
        .strip_suffix(READY)
        .or_else(|| name.strip_suffix(CLAIMED))?;
    if let Some((stem, at)) = rest.rsplit_once(".at") {
        if let Ok(offset) = at.parse::<u64>() {
            return Some((stem.to_owned(), offset));
        }
    }
    Some((rest.to_owned(), 0))
}

/// Creates the directory and proves it writable, so a bad `spill_dir` fails at
/// construction rather than at the close that needs it.
pub fn check_dir(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("spill_dir must not be empty".into());
    }
    let dir = Path::new(path);
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("spill_dir {path:?} cannot be created: {e}"))?;
    let probe = dir.join(format!(
        ".probe-{}-{}{PARTIAL}",
        std::process::id(),
        fastrand::u64(..)
    ));
    let result = std::fs::write(&probe, b"probe\n");
    let _ = std::fs::remove_file(&probe);
    result.map_err(|e| format!("spill_dir {path:?} is not writable: {e}"))
}

/// The name under which a destination's records are spilled and found again: its kind,
/// its name and what it writes into (table, container), never a host, port or secret,
/// so a restart with a moved server or rotated credentials still replays into it.
/// LocalFiles has none: it writes to local disk, where a spill would go too.
pub fn key(spec: &DestinationSpec) -> Option<String> {
    let (kind, identity) = match &spec.target {
        Target::LocalFiles(_) => return None,
        Target::Controlled(c) => ("controlled", c.output_file.clone()),
        Target::Postgres(c) => ("postgres", format!("{}.{}", c.schema, c.table)),
        Target::AzureBlob(c) => {
            let without_query = |u: &Option<String>| {
                u.as_deref()
                    .map(|u| u.split('?').next().unwrap_or_default().to_owned())
                    .unwrap_or_default()
            };
            (
                "azure_blob",
                format!(
                    "{}|{}|{}|{}",
                    without_query(&c.account_url),
                    without_query(&c.container_url),
                    c.container,
                    c.prefix
                ),
            )
        }
    };
    let name = &spec.common.name;
    let readable: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in format!("{kind}\0{name}\0{identity}").bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    Some(format!("{kind}-{readable}-{h:016x}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Common, ControlledConfig, LocalFilesConfig};

    fn spec(name: &str, output: &str) -> DestinationSpec {
        DestinationSpec {
            common: Common {
                name: name.into(),
                ..Default::default()
            },
            target: Target::Controlled(ControlledConfig {
                control_file: "ctl".into(),
                output_file: output.into(),
            }),
        }
    }

    #[test]
    fn keys_are_stable_readable_and_distinct() {
        let a = key(&spec("c/1", "out")).unwrap();
        assert_eq!(a, key(&spec("c/1", "out")).unwrap());
        assert!(a.starts_with("controlled-c_1-"), "{a}");
        assert_ne!(a, key(&spec("c_1", "out")).unwrap());
        assert_ne!(a, key(&spec("c/1", "other")).unwrap());
        let files = DestinationSpec {
            common: Common::default(),
            target: Target::LocalFiles(LocalFilesConfig::default()),
        };
        assert!(key(&files).is_none());
    }

    #[test]
    fn names_carry_the_resume_offset() {
        assert_eq!(parse_name("k.1-2-3.spill"), Some(("k.1-2-3".into(), 0)));
        assert_eq!(
            parse_name("k.1-2-3.at77.claimed"),
            Some(("k.1-2-3".into(), 77))
        );
        assert_eq!(file_name("k.1", 5, READY), "k.1.at5.spill");
        assert_eq!(parse_name("k.1.tmp"), None);
    }

    #[test]
    fn a_file_is_claimed_once_and_a_dead_claim_is_taken_over() {
        let tmp = crate::scratch::ScratchDir::new().unwrap();
        let dir = SpillDir::new(&tmp.path().to_string_lossy(), 1 << 20);
        std::fs::write(tmp.path().join("k.1.spill"), b"{}\n").unwrap();
        std::fs::write(tmp.path().join("other.1.spill"), b"{}\n").unwrap();
        assert!(dir.has_waiting(&["k".into()]));
        let first = dir.claim("k");
        assert_eq!(first.len(), 1);
        assert!(first[0].path.ends_with("k.1.claimed"));
        // Held (its lock is alive): nobody else gets it, in this process or another.
        assert!(dir.claim("k").is_empty());
        drop(first); // the holder dies without releasing
        let again = dir.claim("k");
        assert_eq!(again.len(), 1);
        again.into_iter().next().unwrap().release(&dir, 1);
        assert!(tmp.path().join("k.1.at1.spill").exists());
    }

    #[test]
    fn a_claim_handed_back_is_not_kept_by_a_forked_child() {
        let _serial = crate::flock::testing::FORK_SERIAL.lock();
        let tmp = crate::scratch::ScratchDir::new().unwrap();
        let dir = SpillDir::new(&tmp.path().to_string_lossy(), 1 << 20);
        std::fs::write(tmp.path().join("k.1.spill"), b"{}\n{}\n").unwrap();
        let claimed = dir.claim("k").into_iter().next().unwrap();
        // A worker forked while the parent replays, alive after the parent closes.
        let _child = crate::flock::testing::Child::idle();
        claimed.release(&dir, 3);
        assert_eq!(dir.claim("k").len(), 1);
    }

    #[test]
    fn unfinished_files_are_swept_once_abandoned() {
        let tmp = crate::scratch::ScratchDir::new().unwrap();
        let dir = SpillDir::new(&tmp.path().to_string_lossy(), 1 << 20);
        let (old, fresh, held) = (
            tmp.path().join("k.1.tmp"),
            tmp.path().join("k.2.tmp"),
            tmp.path().join("k.3.tmp"),
        );
        let long_ago = std::time::SystemTime::now() - PARTIAL_STALE * 2;
        for p in [&old, &fresh, &held] {
            std::fs::write(p, b"{").unwrap();
        }
        for p in [&old, &held] {
            File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(long_ago)
                .unwrap();
        }
        let writer = File::open(&held).unwrap();
        assert!(try_lock(&writer).unwrap());
        assert!(dir.claim("k").is_empty());
        assert!(!old.exists() && fresh.exists() && held.exists());
    }
}
