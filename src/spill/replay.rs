//! Feeding a destination's claimed spill files back into its queue, as room frees, so a
//! spill larger than the queue never has to fit in memory.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::sync::Arc;

use super::{decode_line, Claimed, SpillDir};
use crate::queue::Queue;
use crate::record::Record;

/// Longer lines are not records this core wrote (those are capped well below): skipped
/// without being held in memory.
const MAX_LINE: u64 = 16 << 20;

/// Where a file's replay stands: records up to `offset` are queued, and each checkpoint
/// says that once the queue settled its mark, the file is delivered up to its offset.
struct Progress {
    claimed: Claimed,
    offset: u64,
    checkpoints: VecDeque<(u64, u64)>,
}

impl Progress {
    /// The offset up to which every record was settled by the time `settled` records
    /// were.
    fn settled_by(&self, settled: u64) -> u64 {
        self.checkpoints
            .iter()
            .take_while(|&&(mark, _)| mark <= settled)
            .last()
            .map_or(self.claimed.start, |&(_, offset)| offset)
    }
}

pub struct Replay {
    dir: Arc<SpillDir>,
    waiting: VecDeque<Claimed>,
    current: Option<(Progress, BufReader<File>)>,
    /// Files read to the end, deleted once their last record is settled.
    read_out: Vec<Progress>,
    /// A record read but refused by a full queue, and the offset after its line.
    pending: Option<(Arc<Record>, u64)>,
    line: Vec<u8>,
}

/// What one top-up did.
#[derive(Default)]
pub struct TopUp {
    pub queued: u64,
    pub bad_lines: u64,
}

impl Replay {
    /// Claims the files waiting for `key`; `None` when there are none.
    pub fn claim(dir: Arc<SpillDir>, key: &str) -> Option<Replay> {
        let waiting: VecDeque<Claimed> = dir.claim(key).into();
        (!waiting.is_empty()).then(|| Replay {
            dir,
            waiting,
            current: None,
            read_out: Vec::new(),
            pending: None,
            line: Vec::new(),
        })
    }

    /// Every claimed file is read and deleted: nothing left to do.
    pub fn finished(&self) -> bool {
        self.pending.is_none()
            && self.current.is_none()
            && self.waiting.is_empty()
            && self.read_out.is_empty()
    }

    /// Deletes the files whose records are all settled, then queues records while the
    /// queue has room for them. Neither after the queue closed: records settled then may
    /// be in a spill file not yet durable, and [`Replay::finish`] decides.
    pub fn top_up(&mut self, queue: &Queue) -> TopUp {
        let mut done = TopUp::default();
        if queue.is_closed() {
            return done;
        }
        self.read_out.retain_mut(|p| {
            let last = p.checkpoints.back().map_or(0, |c| c.0);
            if queue.settled_upto(last) {
                let _ = std::fs::remove_file(&p.claimed.path);
                false
            } else {
                true
            }
        });
        loop {
            let next = match self.pending.take() {
                Some(p) => Some(p),
                None => self.next_record(queue, &mut done.bad_lines),
            };
            let Some((record, end)) = next else { break };
            match queue.push_replayed(record) {
                Ok(()) => {
                    done.queued += 1;
                    if let Some((p, _)) = self.current.as_mut() {
                        p.offset = end;
                    }
                }
                Err(record) => {
                    self.pending = Some((record, end));
                    break;
                }
            }
        }
        if done.queued > 0 {
            let mark = queue.enqueued_mark();
            if let Some((p, _)) = self.current.as_mut() {
                p.checkpoints.push_back((mark, p.offset));
            }
            // Replayed records are old already: written as soon as the writer can.
            queue.request_flush();
        }
        done
    }

    /// The next good record of the claimed files, skipping (and counting) bad lines.
    fn next_record(&mut self, queue: &Queue, bad: &mut u64) -> Option<(Arc<Record>, u64)> {
        loop {
            if self.current.is_none() {
                let claimed = self.waiting.pop_front()?;
                // A description of its own: a copy of the claimed one would carry its lock
                // into forked children.
                let Ok(mut file) = File::open(&claimed.path) else {
                    // Unreadable now: left for the next start.
                    let start = claimed.start;
                    claimed.release(&self.dir, start);
                    continue;
                };
                let _ = file.seek(SeekFrom::Start(claimed.start));
                let offset = claimed.start;
                let progress = Progress {
                    claimed,
                    offset,
                    checkpoints: VecDeque::new(),
                };
                self.current = Some((progress, BufReader::with_capacity(1 << 20, file)));
            }
            let (progress, reader) = self.current.as_mut().expect("opened above");
            self.line.clear();
            let n = reader
                .by_ref()
                .take(MAX_LINE)
                .read_until(b'\n', &mut self.line)
                .unwrap_or(0);
            if n == 0 {
                let (mut progress, _) = self.current.take().expect("current");
                progress
                    .checkpoints
                    .push_back((queue.enqueued_mark(), progress.offset));
                self.read_out.push(progress);
                continue;
            }
            let end = progress.offset + n as u64;
            if self.line.last() != Some(&b'\n') {
                // Cut short by a crash, or longer than any record: skipped to its end.
                *bad += 1;
                progress.offset = end + skip_line(reader);
                continue;
            }
            match decode_line(&self.line[..n - 1]) {
                Some(record) => return Some((Arc::new(record), end)),
                None => {
                    if !self.line.iter().all(u8::is_ascii_whitespace) {
                        *bad += 1;
                    }
                    progress.offset = end;
                }
            }
        }
    }

    /// Hands the files back at close: each resumes, at the next start, after what this
    /// process queued (`delivered_or_spilled`: every record it queued is now written or in
    /// a spill file of its own), or else after what was settled before spilling began
    /// (those were written; later ones may have been dropped by a spill that failed or was
    /// full), so no record is lost.
    pub fn finish(mut self, queue: &Queue, delivered_or_spilled: bool) {
        let dir = self.dir.clone();
        let written_by = queue.with_state(|s| s.spill_from);
        let current = self.current.take().map(|(p, _)| p);
        for p in std::mem::take(&mut self.read_out)
            .into_iter()
            .chain(current)
        {
            let offset = match written_by {
                Some(settled) if !delivered_or_spilled => p.settled_by(settled),
                _ => p.offset,
            };
            p.claimed.release(&dir, offset);
        }
        for claimed in self.waiting.drain(..) {
            let start = claimed.start;
            claimed.release(&dir, start);
        }
        dir.sync();
    }
}

/// Reads past the rest of an overlong line; returns the bytes skipped.
fn skip_line(reader: &mut BufReader<File>) -> u64 {
    let mut skipped = 0;
    loop {
        let Ok(buf) = reader.fill_buf() else {
            return skipped;
        };
        if buf.is_empty() {
            return skipped;
        }
        let (used, found) = match memchr::memchr(b'\n', buf) {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        reader.consume(used);
        skipped += used as u64;
        if found {
            return skipped;
        }
    }
}
