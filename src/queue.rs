//! The bounded queue of one destination, bounded by records and by bytes. Producers never
//! wait for I/O: a push is a short critical section. The batcher side waits here for a
//! batch to become due (size, bytes, age, a flush or close), then takes everything queued
//! in one O(1) swap, so it never holds the lock while walking records (a writer thread
//! preempted inside a long critical section would stall every producer behind it).
//! Records the batcher holds still count against the bounds until they are resolved.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::metrics::{Counters, DropReason};
use crate::record::Record;

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_records: usize,
    pub max_bytes: usize,
    pub batch_records: usize,
    pub batch_bytes: usize,
    pub batch_delay: Duration,
}

pub struct State {
    items: VecDeque<Arc<Record>>,
    bytes: usize,
    /// The batcher's emptied buffer, handed back for reuse so pushes do not regrow one.
    spare: VecDeque<Arc<Record>>,
    /// Bytes taken by the batcher and not yet resolved.
    taken_bytes: usize,
    /// When the oldest queued record arrived: the batch-age clock.
    oldest_at: Option<Instant>,
    /// Records taken by the batcher and not yet resolved.
    pub in_batch: u64,
    pub counters: Counters,
    /// Records ever queued (a drop at the door never is), and how many of those their
    /// batch has settled: a flush waits on these, so drops counted after the flush began
    /// (a full queue, other threads still logging) cannot stand in for older records.
    enqueued: u64,
    settled: u64,
    /// Everything queued up to this count must be written without waiting for age.
    flush_upto: u64,
    closed: bool,
    /// A blocking push waited its whole time for room and none came: later ones drop at
    /// once until the writer settles a batch (the app's logging calls are serialised by
    /// their handler's lock, so each waiting in turn would multiply the wait).
    starved: bool,
    /// The batch the writer is on (split off and not yet settled), and how many batches
    /// it has started.
    writing: (u64, usize),
    batches_started: u64,
    /// Closed with its writer left behind in I/O: the batches it starts after this one
    /// were counted dropped (`closed`) then, and are not counted again.
    abandoned_after: Option<u64>,
    pub breaker: &'static str,
    /// Set when the writer begins spilling at close (local I/O that ends soon, and whose
    /// end `close` waits for): how many records were settled then. Those were written (or
    /// refused for good); any settled later may be in a spill file that did not survive.
    pub spill_from: Option<u64>,
}

pub struct Queue {
    state: Mutex<State>,
    limits: Limits,
    not_empty: Condvar,
    not_full: Condvar,
    resolved: Condvar,
}

pub enum Next {
    /// Everything that was queued, oldest first; split it with [`Queue::split_batch`].
    Batch(VecDeque<Arc<Record>>),
    Idle,
    Closed,
}

/// Whether a record of `size` bytes fits under the given bounds, counting what the writer
/// has taken and not yet settled. An empty queue always takes one record, so a single record
/// above the byte bound is still delivered; memory stays within the bound plus one record.
fn fits(s: &State, size: usize, max_records: usize, max_bytes: usize) -> bool {
    (s.items.is_empty() && s.in_batch == 0)
        || (s.items.len() + (s.in_batch as usize) < max_records
            && s.bytes + s.taken_bytes + size <= max_bytes)
}

impl Queue {
    pub fn new(limits: Limits) -> Self {
        Queue {
            state: Mutex::new(State {
                items: VecDeque::new(),
                bytes: 0,
                spare: VecDeque::new(),
                taken_bytes: 0,
                oldest_at: None,
                in_batch: 0,
                counters: Counters::default(),
                enqueued: 0,
                settled: 0,
                flush_upto: 0,
                closed: false,
                starved: false,
                writing: (0, 0),
                batches_started: 0,
                abandoned_after: None,
                breaker: "closed",
                spill_from: None,
            }),
            limits,
            not_empty: Condvar::new(),
            not_full: Condvar::new(),
            resolved: Condvar::new(),
        }
    }

    fn has_room(&self, s: &State, size: usize) -> bool {
        fits(s, size, self.limits.max_records, self.limits.max_bytes)
    }

    fn enqueue(&self, s: &mut State, rec: Arc<Record>) -> bool {
        let size = rec.size;
        let was_empty = s.items.is_empty();
        if was_empty {
            s.oldest_at = Some(Instant::now());
        }
        s.items.push_back(rec);
        s.bytes += size;
        s.counters.accepted += 1;
        s.enqueued += 1;
        // Wake the batcher only when it has something new to decide, not on every record.
        was_empty
            || s.items.len() == self.limits.batch_records
            || (s.bytes >= self.limits.batch_bytes && s.bytes - size < self.limits.batch_bytes)
    }

    /// Queues the record, or counts it dropped when the queue is full or closed.
    pub fn push(&self, rec: Arc<Record>) {
        let _ = self.admit(self.state.lock(), rec, true);
    }

    /// Queues the record unless the queue is full (then hands it back, uncounted).
    pub fn try_push(&self, rec: Arc<Record>) -> Result<(), Arc<Record>> {
        self.admit(self.state.lock(), rec, false)
    }

    /// Waits until `deadline` for room (the `on_full="block"` policy), then drops and
    /// counts; drops at once while an earlier wait found no room in its time.
    pub fn push_wait(&self, rec: Arc<Record>, deadline: Instant) {
        let mut s = self.state.lock();
        while !s.closed && !s.starved && !self.has_room(&s, rec.size) {
            if self.not_full.wait_until(&mut s, deadline).timed_out() {
                s.starved = !self.has_room(&s, rec.size);
                break;
            }
        }
        let _ = self.admit(s, rec, true);
    }

    /// One critical section for every way in: queues `rec`, or counts it dropped (always
    /// when closed; when full only if `drop_when_full`), else hands it back uncounted.
    fn admit(
        &self,
        mut s: MutexGuard<'_, State>,
        rec: Arc<Record>,
        drop_when_full: bool,
    ) -> Result<(), Arc<Record>> {
        if s.closed || !self.has_room(&s, rec.size) {
            if !s.closed && !drop_when_full {
                return Err(rec);
            }
            let reason = if s.closed {
                DropReason::Closed
            } else {
                DropReason::QueueFull
            };
            s.counters.accepted += 1;
            s.counters.drop(reason, 1);
            return Ok(());
        }
        let wake = self.enqueue(&mut s, rec);
        drop(s);
        if wake {
            self.not_empty.notify_one();
        }
        Ok(())
    }

    /// Blocks until a batch is due or `idle` passes. Records accepted before `close`
    /// are still handed out; `Closed` comes only once the queue is closed and empty.
    pub fn next_batch(&self, idle: Duration) -> Next {
        let idle_deadline = Instant::now() + idle;
        let mut s = self.state.lock();
        loop {
            if s.items.is_empty() {
                if s.closed {
                    return Next::Closed;
                }
                if self.not_empty.wait_until(&mut s, idle_deadline).timed_out()
                    && s.items.is_empty()
                {
                    return Next::Idle;
                }
                continue;
            }
            let age_deadline = s.oldest_at.unwrap_or_else(Instant::now) + self.limits.batch_delay;
            let flushing = s.flush_upto > s.settled + s.in_batch;
            let due = s.closed
                || flushing
                || s.items.len() >= self.limits.batch_records
                || s.bytes >= self.limits.batch_bytes
                || Instant::now() >= age_deadline;
            if due {
                return Next::Batch(self.take(&mut s));
            }
            if Instant::now() >= idle_deadline {
                return Next::Idle;
            }
            self.not_empty
                .wait_until(&mut s, age_deadline.min(idle_deadline));
        }
    }

    fn take(&self, s: &mut State) -> VecDeque<Arc<Record>> {
        let spare = std::mem::take(&mut s.spare);
        let taken = std::mem::replace(&mut s.items, spare);
        s.in_batch += taken.len() as u64;
        s.taken_bytes += std::mem::take(&mut s.bytes);
        s.oldest_at = None;
        taken
    }

    /// Cuts the next batch off the front of what `next_batch` handed out, within the
    /// batch limits (at least one record); the writer is on it until `resolve`.
    pub fn split_batch(&self, taken: &mut VecDeque<Arc<Record>>) -> (Vec<Arc<Record>>, usize) {
        let (batch, bytes) = self.cut(taken);
        let mut s = self.state.lock();
        s.writing = (batch.len() as u64, bytes);
        s.batches_started += 1;
        (batch, bytes)
    }

    fn cut(&self, taken: &mut VecDeque<Arc<Record>>) -> (Vec<Arc<Record>>, usize) {
        let mut batch = Vec::with_capacity(taken.len().min(self.limits.batch_records));
        let mut bytes = 0;
        while let Some(front) = taken.front() {
            if !batch.is_empty()
                && (batch.len() >= self.limits.batch_records
                    || bytes + front.size > self.limits.batch_bytes)
            {
                break;
            }
            bytes += front.size;
            batch.push(taken.pop_front().expect("front exists"));
        }
        (batch, bytes)
    }

    /// Returns the batcher's emptied buffer for reuse.
    pub fn recycle(&self, mut buffer: VecDeque<Arc<Record>>) {
        buffer.clear();
        let mut s = self.state.lock();
        if buffer.capacity() > s.spare.capacity() {
            s.spare = buffer;
        }
    }

    /// Settles a batch taken by `next_batch`: `written` records written, `spilled` written
    /// to the spill directory, the rest dropped with the reasons given.
    pub fn resolve(
        &self,
        taken: usize,
        taken_bytes: usize,
        (written, spilled): (u64, u64),
        dropped: &[(DropReason, u64)],
        latency: Duration,
    ) {
        let mut s = self.state.lock();
        s.writing = (0, 0);
        if s.abandoned_after.is_some_and(|a| s.batches_started > a) {
            return;
        }
        s.starved = false;
        s.in_batch -= taken as u64;
        s.settled += taken as u64;
        s.taken_bytes -= taken_bytes;
        s.counters.written += written;
        s.counters.spilled += spilled;
        for &(reason, n) in dropped {
            s.counters.drop(reason, n);
        }
        s.counters.batches += 1;
        s.counters.record_latency(latency.as_secs_f64());
        drop(s);
        self.resolved.notify_all();
        self.not_full.notify_all();
    }

    /// Queues a record read back from the spill directory, only while the queue is less
    /// than half full (or empty), so replaying a large spill leaves the app's records room;
    /// hands it back otherwise, or when closed.
    pub fn push_replayed(&self, rec: Arc<Record>) -> Result<(), Arc<Record>> {
        let mut s = self.state.lock();
        let roomy = fits(
            &s,
            rec.size,
            self.limits.max_records.div_ceil(2),
            self.limits.max_bytes / 2,
        );
        if s.closed || !roomy {
            return Err(rec);
        }
        s.counters.replayed += 1;
        let wake = self.enqueue(&mut s, rec);
        drop(s);
        if wake {
            self.not_empty.notify_one();
        }
        Ok(())
    }

    /// How many records were ever queued: a mark for [`Queue::settled_upto`].
    pub fn enqueued_mark(&self) -> u64 {
        self.state.lock().enqueued
    }

    /// Whether every record queued up to `mark` is written, dropped or spilled (the queue
    /// is first in, first out).
    pub fn settled_upto(&self, mark: u64) -> bool {
        self.state.lock().settled >= mark
    }

    pub fn is_closed(&self) -> bool {
        self.state.lock().closed
    }

    pub fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock())
    }

    /// Asks the batcher to write everything queued so far; returns the mark to wait for.
    pub fn request_flush(&self) -> u64 {
        let mut s = self.state.lock();
        let target = s.enqueued;
        s.flush_upto = s.flush_upto.max(target);
        drop(s);
        self.not_empty.notify_one();
        target
    }

    /// Waits until the records queued up to the mark `target` are written or dropped;
    /// returns how many of them are still not (0: all settled).
    pub fn wait_settled(&self, target: u64, deadline: Instant) -> u64 {
        let mut s = self.state.lock();
        while s.settled < target {
            if self.resolved.wait_until(&mut s, deadline).timed_out() {
                break;
            }
        }
        target.saturating_sub(s.settled)
    }

    /// Closes the books of a destination whose writer is left behind in I/O at close:
    /// everything it holds besides the batch it is writing is counted dropped (`closed`)
    /// now, so no more than that batch is in flight when `close` returns; that batch
    /// settles when its write ends. Returns how many were counted.
    /// The writer's current batch started after `abandon`, which counted its records
    /// dropped (`closed`) already.
    pub fn batch_counted_at_abandon(&self) -> bool {
        let s = self.state.lock();
        s.abandoned_after
            .is_some_and(|after| s.batches_started > after)
    }

    /// Marks the start of spilling at close (once), for `close` and the replay.
    pub fn begin_spill(&self) {
        let mut s = self.state.lock();
        let settled = s.settled;
        s.spill_from.get_or_insert(settled);
    }

    pub fn abandon(&self) -> u64 {
        let mut s = self.state.lock();
        if s.abandoned_after.is_some() {
            return 0;
        }
        let (writing, writing_bytes) = s.writing;
        let queued = s.items.len() as u64;
        let held = s.in_batch - writing;
        s.items.clear();
        s.bytes = 0;
        s.in_batch = writing;
        s.taken_bytes = writing_bytes;
        // Settled from a flush's point of view: none of them will be written.
        s.settled = s.enqueued - writing;
        s.counters.drop(DropReason::Closed, queued + held);
        s.abandoned_after = Some(s.batches_started);
        s.closed = true;
        drop(s);
        self.resolved.notify_all();
        self.not_full.notify_all();
        queued + held
    }

    pub fn close(&self) {
        self.state.lock().closed = true;
        self.not_empty.notify_all();
        self.not_full.notify_all();
    }

    pub fn snapshot(&self) -> Snapshot {
        let s = self.state.lock();
        Snapshot {
            counters: s.counters.clone(),
            queue_records: s.items.len() as u64,
            queue_bytes: s.bytes as u64,
            in_flight: s.items.len() as u64 + s.in_batch,
            breaker: s.breaker,
        }
    }
}

pub struct Snapshot {
    pub counters: Counters,
    pub queue_records: u64,
    pub queue_bytes: u64,
    pub in_flight: u64,
    pub breaker: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Kind;

    fn rec(size: usize) -> Arc<Record> {
        let mut r = Record::new(0, "INFO", 20, Kind::App, String::new());
        r.size = size;
        Arc::new(r)
    }

    fn limits() -> Limits {
        Limits {
            max_records: 3,
            max_bytes: 1000,
            batch_records: 2,
            batch_bytes: 10_000,
            batch_delay: Duration::from_secs(60),
        }
    }

    fn invariant(q: &Queue) {
        let s = q.snapshot();
        assert_eq!(
            s.counters.accepted,
            s.counters.written + s.counters.dropped_total() + s.counters.spilled + s.in_flight
        );
    }

    #[test]
    fn full_queue_drops_and_counts() {
        let q = Queue::new(limits());
        for _ in 0..5 {
            q.push(rec(10));
            invariant(&q);
        }
        let s = q.snapshot();
        assert_eq!(s.queue_records, 3);
        assert_eq!(s.counters.dropped[DropReason::QueueFull as usize], 2);
    }

    #[test]
    fn byte_bound_applies() {
        let q = Queue::new(limits());
        q.push(rec(600));
        q.push(rec(600));
        assert_eq!(q.snapshot().queue_records, 1);
        invariant(&q);
    }

    #[test]
    fn batches_come_by_size_and_flush() {
        let q = Queue::new(limits());
        q.push(rec(1));
        assert!(matches!(
            q.next_batch(Duration::from_millis(20)),
            Next::Idle
        ));
        q.push(rec(1));
        let Next::Batch(mut b) = q.next_batch(Duration::from_millis(20)) else {
            panic!("due by size")
        };
        assert_eq!(b.len(), 2);
        invariant(&q);
        let (first, bytes) = q.split_batch(&mut b);
        assert_eq!((first.len(), bytes, b.len()), (2, 2, 0));
        q.resolve(2, 2, (2, 0), &[], Duration::from_millis(1));
        q.push(rec(1));
        let target = q.request_flush();
        let Next::Batch(b) = q.next_batch(Duration::from_millis(20)) else {
            panic!("due by flush")
        };
        q.resolve(
            b.len(),
            1,
            (0, 0),
            &[(DropReason::Failed, 1)],
            Duration::ZERO,
        );
        assert_eq!(q.wait_settled(target, Instant::now()), 0);
        invariant(&q);
    }

    #[test]
    fn a_flush_waits_for_queued_records_not_for_later_drops() {
        let q = Queue::new(limits());
        q.push(rec(1));
        let target = q.request_flush();
        let Next::Batch(b) = q.next_batch(Duration::from_millis(20)) else {
            panic!("due by flush")
        };
        // Another thread goes on logging into a closed (or full) queue: every record is
        // counted dropped at once, and `resolved()` passes the flush's mark.
        q.close();
        for _ in 0..5 {
            q.push(rec(1));
        }
        assert!(q.snapshot().counters.resolved() >= target);
        assert_eq!(q.wait_settled(target, Instant::now()), 1);
        q.resolve(b.len(), 1, (1, 0), &[], Duration::ZERO);
        assert_eq!(q.wait_settled(target, Instant::now()), 0);
        invariant(&q);
    }

    #[test]
    fn close_drains_then_ends() {
        let q = Queue::new(limits());
        q.push(rec(1));
        q.close();
        assert!(matches!(q.next_batch(Duration::ZERO), Next::Batch(_)));
        assert!(matches!(q.next_batch(Duration::ZERO), Next::Closed));
        q.push(rec(1));
        assert_eq!(
            q.snapshot().counters.dropped[DropReason::Closed as usize],
            1
        );
    }

    #[test]
    fn blocking_push_waits_for_room() {
        let q = Arc::new(Queue::new(limits()));
        for _ in 0..3 {
            q.push(rec(1));
        }
        let q2 = q.clone();
        let t = std::thread::spawn(move || {
            q2.push_wait(rec(1), Instant::now() + Duration::from_secs(5))
        });
        std::thread::sleep(Duration::from_millis(50));
        let Next::Batch(mut taken) = q.next_batch(Duration::ZERO) else {
            panic!()
        };
        assert_eq!(taken.len(), 3);
        // Taken records still count against the bound until they are resolved.
        assert_eq!(q.snapshot().queue_records, 0);
        let (batch, bytes) = q.split_batch(&mut taken);
        assert_eq!((batch.len(), taken.len()), (2, 1));
        q.resolve(batch.len(), bytes, (2, 0), &[], Duration::ZERO);
        t.join().unwrap();
        assert_eq!(q.snapshot().queue_records, 1);
        let soon = || Instant::now() + Duration::from_millis(10);
        q.push_wait(rec(1), soon());
        q.push_wait(rec(1), soon());
        let full = |q: &Queue| q.snapshot().counters.dropped[DropReason::QueueFull as usize];
        assert_eq!(full(&q), 1);
        invariant(&q);
        // That wait found no room: the next ones drop at once, not after their own wait
        // (callers queue behind their logging handler's lock).
        let t0 = Instant::now();
        q.push_wait(rec(1), t0 + Duration::from_secs(30));
        assert!(t0.elapsed() < Duration::from_secs(29));
        assert_eq!(full(&q), 2);
        // Settling a batch makes room, and waiting makes sense again.
        let (rest, bytes) = q.split_batch(&mut taken);
        q.resolve(rest.len(), bytes, (1, 0), &[], Duration::ZERO);
        q.push_wait(rec(1), soon());
        assert_eq!(full(&q), 2);
        invariant(&q);
    }

    #[test]
    fn replayed_records_leave_half_the_queue_to_the_app() {
        let q = Queue::new(Limits {
            max_records: 10,
            ..limits()
        });
        let replayed = (0..8).filter(|_| q.push_replayed(rec(1)).is_ok()).count();
        assert_eq!(replayed, 5);
        for _ in 0..5 {
            q.push(rec(1));
        }
        let s = q.snapshot();
        assert_eq!((s.queue_records, s.counters.replayed), (10, 5));
        assert_eq!(s.counters.dropped_total(), 0);
        q.close();
        assert!(q.push_replayed(rec(1)).is_err());
        invariant(&q);
    }

    #[test]
    fn abandoning_counts_what_is_in_flight_once() {
        let q = Queue::new(Limits {
            max_records: 10,
            ..limits()
        });
        q.push(rec(1));
        q.push(rec(1));
        q.push(rec(1));
        let Next::Batch(mut taken) = q.next_batch(Duration::ZERO) else {
            panic!()
        };
        q.push(rec(1));
        let (batch, bytes) = q.split_batch(&mut taken); // 2 of the 3 taken, in I/O
        assert_eq!(batch.len(), 2);
        // One queued, one taken but not yet being written: dropped now.
        assert_eq!(q.abandon(), 2);
        let closed = |q: &Queue| q.snapshot().counters.dropped[DropReason::Closed as usize];
        assert_eq!((q.snapshot().in_flight, closed(&q)), (2, 2));
        invariant(&q);
        // The write under way ends and counts; what the writer does after is not counted
        // again (it was dropped as closed already).
        q.resolve(batch.len(), bytes, (2, 0), &[], Duration::ZERO);
        let (rest, bytes) = q.split_batch(&mut taken);
        q.resolve(
            rest.len(),
            bytes,
            (0, 0),
            &[(DropReason::Closed, 1)],
            Duration::ZERO,
        );
        let s = q.snapshot();
        assert_eq!((s.counters.written, closed(&q), s.in_flight), (2, 2, 0));
        invariant(&q);
    }
}
