//! Fan-out of records to destinations and the lifecycle of the core: one queue, one
//! batcher thread, one breaker and one writer per destination, so a dead store never
//! slows another store or the app.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::breaker::{self, Breaker};
use crate::config::{seconds, Common, DestinationSpec, OnFull, PipelineOptions, Target};
use crate::destinations::{self, Abort, ErrorKind, Writer};
use crate::metrics::DropReason;
use crate::queue::{Limits, Next, Queue, Snapshot};
use crate::record::{Kind, Record};
use crate::retry::Backoff;
use crate::spill::{self, Replay, SpillDir, SpillWriter};

/// How the core reports its own problems (the Python face sends them to the stdlib
/// logger "logsluice"). Arguments: a stdlib level number and the message.
pub type Reporter = Arc<dyn Fn(u16, &str) + Send + Sync>;

static FORK_GENERATION: AtomicU64 = AtomicU64::new(0);
static ATFORK: Once = Once::new();

extern "C" fn after_fork_in_child() {
    FORK_GENERATION.fetch_add(1, Ordering::SeqCst);
}

/// Counts forks, so a child notices that its core's threads did not come along.
pub fn fork_generation() -> u64 {
    ATFORK.call_once(|| unsafe {
        libc::pthread_atfork(None, None, Some(after_fork_in_child));
    });
    FORK_GENERATION.load(Ordering::Relaxed)
}

thread_local! {
    static REPORTING: Cell<bool> = const { Cell::new(false) };
}

/// True while this thread is inside the reporter: records logged from there (a user's
/// handler on the "logsluice" logger that feeds back into a sink) are ignored, not looped.
pub fn reporting() -> bool {
    REPORTING.with(Cell::get)
}

/// Lets one message per destination through every `interval`, counting the rest.
struct RateLimit {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    fn check(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

pub struct Destination {
    pub common: Common,
    pub queue: Arc<Queue>,
    abort: Arc<Abort>,
    thread: Mutex<Option<JoinHandle<()>>>,
    reporter: Reporter,
    limit: Mutex<RateLimit>,
    /// Where this destination's records go at close instead of being dropped, and under
    /// which key (see `spill`).
    spill: Option<(Arc<SpillDir>, String)>,
    spill_out: Mutex<Option<SpillWriter>>,
    /// The files a previous run spilled for this destination, fed in by its thread (the
    /// first top-up may come from [`Core::replay_first`], off the caller's logging path).
    replay: Mutex<Option<Replay>>,
    warned_bad_lines: AtomicBool,
}

impl Destination {
    fn report(&self, level: u16, message: &str) {
        let Some(suppressed) = self.limit.lock().check() else {
            return;
        };
        let mut text = format!("logsluice destination {:?}: {message}", self.common.name);
        if suppressed > 0 {
            text.push_str(&format!(" ({suppressed} similar messages suppressed)"));
        }
        self.send(level, &text);
    }

    /// Reports past the rate limit: news that must not be lost among repeated failures.
    fn report_now(&self, level: u16, message: &str) {
        self.limit.lock().last = Some(Instant::now());
        self.send(
            level,
            &format!("logsluice destination {:?}: {message}", self.common.name),
        );
    }

    /// Publishes the breaker's state to `stats()` after each of its transitions.
    fn show(&self, breaker: &Breaker) {
        let state = breaker.name();
        self.queue.with_state(|s| s.breaker = state);
    }

    fn send(&self, level: u16, text: &str) {
        REPORTING.with(|r| r.set(true));
        (self.reporter)(level, text);
        REPORTING.with(|r| r.set(false));
    }
}

pub struct Core {
    pub dests: Vec<Arc<Destination>>,
    pub options: PipelineOptions,
    /// The lowest `min_level` any destination wants, per kind: records below are never built.
    floor: [u16; 2],
    closed: AtomicBool,
}

/// A record that found its queue full under `on_full="block"`: the caller waits for room
/// outside the GIL, then calls [`Core::wait_for_room`].
pub struct Blocked {
    dest: Arc<Destination>,
    record: Arc<Record>,
}

impl Core {
    pub fn start(
        specs: Vec<DestinationSpec>,
        options: PipelineOptions,
        reporter: Reporter,
    ) -> Arc<Core> {
        let mut floor = [u16::MAX; 2];
        let mut dests = Vec::new();
        let spill_dir = options
            .spill_dir
            .as_deref()
            .map(|p| Arc::new(SpillDir::new(p, options.spill_max_bytes)));
        for spec in specs {
            let spill = spill_dir
                .as_ref()
                .and_then(|d| Some((d.clone(), spill::key(&spec)?)));
            for kind in &spec.common.kinds {
                let slot = &mut floor[*kind as usize];
                *slot = (*slot).min(spec.common.min_level);
            }
            let c = &spec.common;
            let queue = Arc::new(Queue::new(Limits {
                max_records: c.queue_max_records,
                max_bytes: c.queue_max_bytes,
                batch_records: c.batch_max_records,
                batch_bytes: c.batch_max_bytes,
                batch_delay: seconds(c.batch_max_delay),
            }));
            let dest = Arc::new(Destination {
                common: spec.common.clone(),
                queue,
                abort: Arc::new(Abort::default()),
                thread: Mutex::new(None),
                reporter: reporter.clone(),
                limit: Mutex::new(RateLimit {
                    interval: Duration::from_secs(10),
                    last: None,
                    suppressed: 0,
                }),
                replay: Mutex::new(
                    spill
                        .as_ref()
                        .and_then(|(dir, key)| Replay::claim(dir.clone(), key)),
                ),
                spill,
                spill_out: Mutex::new(None),
                warned_bad_lines: AtomicBool::new(false),
            });
            if dest.replay.lock().is_some() {
                dest.report_now(
                    20,
                    "delivering the records a previous run spilled at close, before new ones",
                );
            }
            let worker = dest.clone();
            let target = spec.target;
            let handle = std::thread::Builder::new()
                .name(format!("logsluice-{}", dest.common.name))
                .spawn(move || run(worker, target))
                .expect("spawning a thread");
            *dest.thread.lock() = Some(handle);
            dests.push(dest);
        }
        Arc::new(Core {
            dests,
            options,
            floor,
            closed: AtomicBool::new(false),
        })
    }

    /// Whether any destination would take a record of this level and kind.
    pub fn wants(&self, level_no: u16, kind: Kind) -> bool {
        level_no >= self.floor[kind as usize]
    }

    /// Routes one record to every destination that wants it. Never waits; records that
    /// meet a full queue under `on_full="block"` come back for [`Core::wait_for_room`].
    pub fn submit(&self, record: Record) -> Vec<Blocked> {
        let record = Arc::new(record);
        let mut blocked = Vec::new();
        for d in &self.dests {
            if !d.common.wants(record.level_no, record.kind) {
                continue;
            }
            match d.common.on_full {
                OnFull::Drop => d.queue.push(record.clone()),
                OnFull::Block => {
                    if let Err(record) = d.queue.try_push(record.clone()) {
                        blocked.push(Blocked {
                            dest: d.clone(),
                            record,
                        });
                    }
                }
            }
        }
        blocked
    }

    /// Waits for room in each full queue, all from one start: a record blocked at two
    /// destinations waits `block_timeout` once, not once per destination.
    pub fn wait_for_room(blocked: Vec<Blocked>) {
        let start = Instant::now();
        for b in blocked {
            let deadline = start + seconds(b.dest.common.block_timeout);
            b.dest.queue.push_wait(b.record, deadline);
        }
    }

    /// Waits until everything accepted before the call is written or dropped. On timeout,
    /// returns the destinations still pending with their counts.
    pub fn flush(&self, timeout: Duration) -> Result<(), Vec<(String, u64)>> {
        let deadline = Instant::now() + timeout;
        let targets: Vec<u64> = self.dests.iter().map(|d| d.queue.request_flush()).collect();
        let mut pending = Vec::new();
        for (d, target) in self.dests.iter().zip(targets) {
            let left = d.queue.wait_settled(target, deadline);
            if left > 0 {
                pending.push((d.common.name.clone(), left));
            }
        }
        if pending.is_empty() {
            Ok(())
        } else {
            Err(pending)
        }
    }

    /// Flushes, stops the threads and closes the writers. What cannot be written within
    /// `timeout` is spilled when a spill directory is set, else dropped with reason
    /// `closed` (counted, and reported). Idempotent.
    pub fn close(&self, timeout: Duration) -> Result<(), Vec<(String, u64)>> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let deadline = Instant::now() + timeout;
        let flushed = self.flush(timeout);
        for d in &self.dests {
            if flushed.is_err() {
                d.abort.fire();
            }
            d.queue.close();
        }
        // Once everything was written, writers get a moment to close their files even when
        // the caller gave no time. Otherwise the abort cuts a writer's pause between attempts
        // and its network I/O short, and the batch it held is spilled or counted (`closed`) by its own
        // thread within moments; a writer stuck in I/O no abort reaches (a local file) is
        // left behind rather than hanging exit, and what it held is counted dropped now.
        let grace = if flushed.is_ok() {
            deadline.max(Instant::now() + Duration::from_millis(500))
        } else {
            deadline.max(Instant::now() + ABORT_GRACE)
        };
        // Spilling is local I/O that ends soon: waited for past the deadline (once for all
        // destinations), since what it saves would otherwise be dropped.
        let spill_deadline = grace + SPILL_GRACE;
        for d in &self.dests {
            let handle = d.thread.lock().take();
            if let Some(handle) = handle {
                let waiting = || {
                    let now = Instant::now();
                    now < grace
                        || (now < spill_deadline && d.queue.with_state(|s| s.spill_from.is_some()))
                };
                while !handle.is_finished() && waiting() {
                    std::thread::sleep(Duration::from_millis(2));
                }
                if handle.is_finished() {
                    let _ = handle.join();
                } else {
                    d.queue.abandon();
                }
            }
        }
        flushed
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    pub fn stats(&self) -> Vec<(String, Snapshot)> {
        self.dests
            .iter()
            .map(|d| (d.common.name.clone(), d.queue.snapshot()))
            .collect()
    }
}

/// Marks the calling thread as background work for the scheduler (Linux `SCHED_BATCH`):
/// it keeps its fair share of CPU, so nothing queues up, but waking it never preempts a
/// running thread. Encoding and writing a batch then waits for the application's threads
/// to block instead of cutting in front of a request (what raised the p99 latency of a
/// server that shares its cores with the pipeline).
pub fn yield_to_application() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: plain system call on the calling thread (pid 0) with a valid parameter;
        // a refusal leaves the thread as it was, which is harmless.
        unsafe {
            libc::sched_setscheduler(0, libc::SCHED_BATCH, &param);
        }
    }
}

/// Called between slices of a long piece of background work (encoding a large batch,
/// building a lane's records): a thread of the application that became runnable on this
/// core runs first, instead of waiting for the whole batch (milliseconds at 4 MB).
pub fn let_application_run() {
    std::thread::yield_now();
}

/// How long `close` waits, past its deadline, for a destination writing its spill file.
const SPILL_GRACE: Duration = Duration::from_secs(10);

/// The batcher loop of one destination, on its own thread.
fn run(dest: Arc<Destination>, target: Target) {
    yield_to_application();
    let c = &dest.common;
    let mut breaker = Breaker::new(c.breaker_threshold, seconds(c.breaker_cooldown));
    let backoff = Backoff {
        initial: seconds(c.retry_initial),
        max: seconds(c.retry_max),
    };
    let mut writer: Option<Box<dyn Writer>> = None;
    loop {
        replay_more(&dest);
        match dest.queue.next_batch(Duration::from_secs(1)) {
            Next::Closed => break,
            Next::Idle => {
                if let Some(w) = writer.as_mut() {
                    w.idle();
                }
            }
            Next::Batch(mut taken) => {
                while !taken.is_empty() {
                    let (batch, bytes) = dest.queue.split_batch(&mut taken);
                    let started = Instant::now();
                    let settled =
                        deliver(&dest, &target, &mut writer, &mut breaker, &backoff, &batch);
                    dest.queue.resolve(
                        batch.len(),
                        bytes,
                        (settled.written, settled.spilled),
                        &settled.dropped,
                        started.elapsed(),
                    );
                }
                dest.queue.recycle(taken);
            }
        }
        if let Some(w) = writer.as_mut() {
            for (level, message) in w.notices() {
                dest.report(level, &message);
            }
        }
    }
    if let Some(mut w) = writer {
        if let Err(e) = w.close() {
            dest.report(30, &format!("closing failed: {}", e.message));
        }
    }
    let complete = finish_spill(&dest);
    if let Some(r) = dest.replay.lock().take() {
        r.finish(&dest.queue, complete);
    }
}

impl Core {
    /// Queues the first of the records a previous run spilled, on the caller's thread: they
    /// come before any new record, and a flush right after the start waits for them. For a
    /// caller that may block on reading them (the Python pipeline's construction, without
    /// the GIL); otherwise the destination's thread does it.
    pub fn replay_first(&self) {
        for d in &self.dests {
            replay_more(d);
        }
    }
}

/// Queues more of the spilled records as the queue has room, and lets go of the replay
/// once every claimed file is delivered.
fn replay_more(dest: &Destination) {
    let mut replay = dest.replay.lock();
    let Some(r) = replay.as_mut() else {
        return;
    };
    let t = r.top_up(&dest.queue);
    if t.bad_lines > 0 {
        dest.queue
            .with_state(|s| s.counters.spill_bad_lines += t.bad_lines);
        if !dest.warned_bad_lines.swap(true, Ordering::Relaxed) {
            dest.report_now(
                30,
                "skipped lines of a spill file that are not records (cut short or damaged); \
                 stats() counts them as spill_bad_lines",
            );
        }
    }
    if r.finished() {
        *replay = None;
    }
}

/// Makes this close's spill file durable and says what became of the records held.
/// Returns whether every record that reached the spill path was saved.
fn finish_spill(dest: &Destination) -> bool {
    let Some(out) = dest.spill_out.lock().take() else {
        return true;
    };
    let result = out.finish();
    if result.lost > 0 {
        dest.queue.with_state(|s| {
            // A writer left behind at close had its records counted `closed` already.
            let lost = result.lost.min(s.counters.spilled);
            s.counters.spilled -= lost;
            s.counters.drop(DropReason::Closed, lost);
        });
    }
    if let Some(error) = &result.error {
        dest.report_now(
            30,
            &format!(
                "the spill directory failed ({error}): records held at close are dropped as \
                 closed"
            ),
        );
    }
    if let Some((path, n)) = &result.file {
        dest.report_now(
            30,
            &format!(
                "the store was not reachable before close: {n} records spilled to {}, delivered \
                 by the next start with this spill_dir",
                path.display()
            ),
        );
    }
    if result.full > 0 {
        dest.report_now(
            30,
            &format!(
                "{} records dropped at close: the spill directory is at spill_max_bytes \
                 (spill_full)",
                result.full
            ),
        );
    }
    result.complete
}

/// What became of a batch.
#[derive(Default)]
struct Settled {
    written: u64,
    spilled: u64,
    dropped: Vec<(DropReason, u64)>,
}

impl Settled {
    fn dropped(reason: DropReason, n: u64) -> Settled {
        Settled {
            dropped: vec![(reason, n)],
            ..Default::default()
        }
    }

    fn merge(&mut self, other: Settled) {
        self.written += other.written;
        self.spilled += other.spilled;
        for (reason, count) in other.dropped {
            match self.dropped.iter_mut().find(|(r, _)| *r == reason) {
                Some(slot) => slot.1 += count,
                None => self.dropped.push((reason, count)),
            }
        }
    }
}

/// How one round of attempts at a batch ended.
enum Round {
    Written(destinations::Outcome),
    /// The store refused the batch for good (authentication, permissions, a missing
    /// container): no retry can mend it.
    Refused(destinations::WriteError),
    /// Still failing after the round's retries: the store is unavailable for now.
    Unavailable(destinations::WriteError, u32),
    /// The store answered but could not take the batch as it is.
    Oversized(destinations::WriteError, u32),
    Aborted,
}

/// Writes one batch and settles it. A store that is unavailable never costs records:
/// the batch is held and tried again (rounds of retries, then the breaker's cooldown and
/// a probe) while the records behind it wait in the queue, within its bounds. Records are
/// dropped only when the store refuses them for good (`failed`, `invalid`) or the
/// pipeline closes before the store is back (`closed`, or spilled with a spill directory).
fn deliver(
    dest: &Destination,
    target: &Target,
    writer: &mut Option<Box<dyn Writer>>,
    breaker: &mut Breaker,
    backoff: &Backoff,
    batch: &[Arc<Record>],
) -> Settled {
    let n = batch.len() as u64;
    let mut outage: Option<(Instant, u64)> = None;
    let mut reports = OutageReports::new();
    let mut rounds = 0;
    loop {
        if dest.abort.is_fired() {
            return closing(dest, writer, batch);
        }
        if let breaker::State::Open { until } = breaker.state() {
            sleep_unless_aborted(dest, until.saturating_duration_since(Instant::now()));
            if !breaker.allow(Instant::now()) {
                continue;
            }
            dest.show(breaker);
        }
        if rounds > 0 {
            dest.queue.with_state(|s| s.counters.retries += 1);
        }
        let round = attempt_round(dest, target, writer, breaker, backoff, batch);
        let (err, attempts) = match round {
            Round::Written(outcome) => {
                let reopened = breaker.state() != breaker::State::Closed;
                breaker.success();
                dest.show(breaker);
                if let Some((since, full_before)) = outage {
                    let now = dest.queue.snapshot();
                    let overflow =
                        now.counters.dropped[DropReason::QueueFull as usize] - full_before;
                    let note = if reopened {
                        "; circuit breaker closed"
                    } else {
                        ""
                    };
                    dest.report_now(
                        20,
                        &format!(
                            "delivering again after {:.1} s: {} records held meanwhile, {overflow} \
                             dropped for want of queue room{note}",
                            since.elapsed().as_secs_f64(),
                            now.in_flight,
                        ),
                    );
                }
                let invalid = outcome.invalid.min(n);
                let dropped = if invalid > 0 {
                    vec![(DropReason::Invalid, invalid)]
                } else {
                    vec![]
                };
                return Settled {
                    written: n - invalid,
                    dropped,
                    ..Default::default()
                };
            }
            Round::Aborted => return closing(dest, writer, batch),
            Round::Refused(err) => {
                breaker.failure(Instant::now());
                dest.show(breaker);
                dest.report(
                    40,
                    &format!(
                        "dropped a batch of {n} records: {} (an error no retry can mend)",
                        err.message
                    ),
                );
                return Settled::dropped(DropReason::Failed, n);
            }
            Round::Oversized(err, _) if batch.len() > 1 => {
                // Not an outage: the store answered. Halves go on their own, down to one
                // record, which is then held like any other (records are capped in size).
                let half = batch.len() / 2;
                dest.report(
                    30,
                    &format!(
                        "a batch of {n} records was too much for one write ({}); writing it in \
                         pieces of {half}",
                        err.message
                    ),
                );
                let mut settled = deliver(dest, target, writer, breaker, backoff, &batch[..half]);
                settled.merge(deliver(
                    dest,
                    target,
                    writer,
                    breaker,
                    backoff,
                    &batch[half..],
                ));
                return settled;
            }
            Round::Unavailable(err, attempts) | Round::Oversized(err, attempts) => (err, attempts),
        };
        let starting = outage.is_none();
        outage.get_or_insert_with(|| {
            let full = dest.queue.snapshot().counters.dropped[DropReason::QueueFull as usize];
            (Instant::now(), full)
        });
        let was_closed = breaker.state() == breaker::State::Closed;
        breaker.failure(Instant::now());
        dest.show(breaker);
        let waiting = dest.queue.snapshot().in_flight;
        let next = match breaker.state() {
            breaker::State::Open { until } => format!(
                "circuit breaker open, next attempt in {:.1} s",
                until
                    .saturating_duration_since(Instant::now())
                    .as_secs_f64()
            ),
            _ => "retrying".to_owned(),
        };
        let message = format!(
            "store unavailable after {attempts} attempt(s): {}; holding {waiting} records, {next}",
            err.message
        );
        // The start of an outage and the breaker opening are news; failed probes of an open
        // breaker are reported at doubling intervals, retries before it opens rate limited.
        let opened = was_closed && breaker.state() != breaker::State::Closed;
        let now = Instant::now();
        if opened {
            reports.opened(now);
        }
        if starting || opened {
            dest.report_now(30, &message);
        } else {
            match reports.failed(now) {
                Report::RateLimited => dest.report(30, &message),
                Report::Quiet => {}
                Report::Due(unreported) => {
                    let since = outage.map_or(0.0, |(t, _)| t.elapsed().as_secs_f64());
                    dest.report_now(
                        30,
                        &format!(
                            "{message} (out for {since:.0} s; {unreported} failed attempts not \
                             reported since the last report)"
                        ),
                    );
                }
            }
        }
        if breaker.state() == breaker::State::Closed {
            sleep_unless_aborted(dest, backoff.delay(rounds));
        }
        rounds += 1;
    }
}

/// How an outage's failed attempts are reported once the breaker is open: the opening is
/// reported, then one report a minute later, then at doubling intervals up to an hour, each
/// with the count of failed attempts it stands for. One probe per `breaker_cooldown` (10 s
/// by default) would otherwise be one report each: 360 an hour.
struct OutageReports {
    /// When the next report is due; `None` until the breaker opens.
    next: Option<Instant>,
    interval: Duration,
    unreported: u64,
}

enum Report {
    /// The breaker has not opened yet: reported within the destination's rate limit.
    RateLimited,
    /// Counted for the next report.
    Quiet,
    /// Due now; the failed attempts not reported since the last report.
    Due(u64),
}

impl OutageReports {
    const FIRST: Duration = Duration::from_secs(60);
    const LONGEST: Duration = Duration::from_secs(3600);

    fn new() -> Self {
        OutageReports {
            next: None,
            interval: Self::FIRST,
            unreported: 0,
        }
    }

    /// The breaker opened (reported at once).
    fn opened(&mut self, now: Instant) {
        self.interval = Self::FIRST;
        self.next = Some(now + self.interval);
        self.unreported = 0;
    }

    /// A failed attempt other than the outage's first or the breaker's opening.
    fn failed(&mut self, now: Instant) -> Report {
        let Some(next) = self.next else {
            return Report::RateLimited;
        };
        if now < next {
            self.unreported += 1;
            return Report::Quiet;
        }
        self.interval = (self.interval * 2).min(Self::LONGEST);
        self.next = Some(now + self.interval);
        Report::Due(std::mem::take(&mut self.unreported))
    }
}

/// Spills a batch held at close, or counts it dropped without a spill directory. A writer
/// whose last COMMIT went unanswered is told, with no time to ask, and says the batch may
/// be stored all the same (then a spilled batch may be stored twice: the one duplicate
/// the spill allows).
fn closing(
    dest: &Destination,
    writer: &mut Option<Box<dyn Writer>>,
    batch: &[Arc<Record>],
) -> Settled {
    let _ = writer
        .as_mut()
        .and_then(|w| w.given_up(batch, Duration::ZERO));
    let Some((dir, key)) = dest
        .spill
        .as_ref()
        .filter(|_| !dest.queue.batch_counted_at_abandon())
    else {
        return Settled::dropped(DropReason::Closed, batch.len() as u64);
    };
    dest.queue.begin_spill();
    let mut out = dest.spill_out.lock();
    let out = out.get_or_insert_with(|| SpillWriter::new(dir.clone(), key.clone()));
    let (spilled, dropped) = out.spill(batch);
    Settled {
        spilled,
        dropped,
        ..Default::default()
    }
}

/// One attempt and its retries (none for a half-open breaker's probe).
fn attempt_round(
    dest: &Destination,
    target: &Target,
    writer: &mut Option<Box<dyn Writer>>,
    breaker: &Breaker,
    backoff: &Backoff,
    batch: &[Arc<Record>],
) -> Round {
    let timeout = seconds(dest.common.attempt_timeout);
    let retries = if breaker.state() == breaker::State::HalfOpen {
        0
    } else {
        dest.common.max_retries
    };
    let mut attempt = 0;
    loop {
        if dest.abort.is_fired() {
            return Round::Aborted;
        }
        let result = match writer.as_mut() {
            Some(w) => w.write_batch(batch, timeout),
            None => destinations::open(target, &dest.abort)
                .and_then(|w| writer.insert(w).write_batch(batch, timeout)),
        };
        let err = match result {
            Ok(outcome) => return Round::Written(outcome),
            Err(e) => e,
        };
        dest.queue
            .with_state(|s| s.counters.last_error = Some(err.message.clone()));
        if dest.abort.is_fired() {
            return Round::Aborted;
        }
        if err.kind == ErrorKind::Permanent {
            // A batch whose last COMMIT went unanswered may be stored after all: the writer
            // asks once more before the batch counts as not written. A held batch needs no
            // such question: its next attempt settles the doubt first.
            if let Some(outcome) = writer.as_mut().and_then(|w| w.given_up(batch, timeout)) {
                return Round::Written(outcome);
            }
            return Round::Refused(err);
        }
        if attempt >= retries {
            return if err.kind == ErrorKind::Oversized {
                Round::Oversized(err, attempt + 1)
            } else {
                Round::Unavailable(err, attempt + 1)
            };
        }
        dest.queue.with_state(|s| s.counters.retries += 1);
        sleep_unless_aborted(dest, backoff.delay_with_hint(attempt, err.retry_after));
        attempt += 1;
    }
}

/// Waits between attempts, holding a batch but doing no I/O: the thread answers an abort
/// within one slice of this sleep, well within the `ABORT_GRACE` that `close` gives it.
fn sleep_unless_aborted(dest: &Destination, total: Duration) {
    let end = Instant::now() + total;
    while !dest.abort.is_fired() {
        let now = Instant::now();
        if now >= end {
            break;
        }
        std::thread::sleep((end - now).min(PAUSE_SLICE));
    }
}

const PAUSE_SLICE: Duration = Duration::from_millis(20);

/// How long `close` waits, past its deadline, for aborted writers to count what they held.
const ABORT_GRACE: Duration = Duration::from_millis(250);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ControlledConfig, LocalFilesConfig};

    fn spec(target: Target, common: Common) -> DestinationSpec {
        DestinationSpec { common, target }
    }

    fn quiet() -> Reporter {
        Arc::new(|_, _| {})
    }

    #[test]
    fn routes_by_level_and_kind_and_flushes_to_files() {
        let tmp = crate::scratch::ScratchDir::new().unwrap();
        let files = Target::LocalFiles(LocalFilesConfig {
            directory: tmp.path().to_string_lossy().into(),
            ..Default::default()
        });
        let warn_only = Common {
            name: "warn".into(),
            min_level: 30,
            ..Default::default()
        };
        let out = tmp.path().join("warn.ndjson");
        let controlled = Target::Controlled(ControlledConfig {
            control_file: tmp.path().join("ctl").to_string_lossy().into(),
            output_file: out.to_string_lossy().into(),
        });
        let core = Core::start(
            vec![
                spec(
                    files,
                    Common {
                        name: "local_files".into(),
                        ..Default::default()
                    },
                ),
                spec(controlled, warn_only),
            ],
            PipelineOptions::default(),
            quiet(),
        );
        assert!(core.wants(5, Kind::App) && core.wants(5, Kind::Http));
        for (i, level) in [(0, 20), (1, 30), (2, 40)] {
            core.submit(Record::new(i, "X", level, Kind::App, format!("m{i}")).finish(100));
        }
        core.flush(Duration::from_secs(5)).unwrap();
        let stats = core.stats();
        assert_eq!(stats[0].1.counters.written, 3);
        assert_eq!(stats[1].1.counters.written, 2);
        assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 2);
        core.close(Duration::from_secs(5)).unwrap();
        core.submit(Record::new(9, "X", 40, Kind::App, "late".into()).finish(100));
        assert_eq!(
            core.stats()[0].1.counters.dropped[DropReason::Closed as usize],
            1
        );
    }

    #[test]
    fn an_unavailable_store_holds_records_until_it_is_back() {
        let tmp = crate::scratch::ScratchDir::new().unwrap();
        let ctl = tmp.path().join("ctl");
        std::fs::write(&ctl, "fail").unwrap();
        let out = tmp.path().join("out");
        let common = Common {
            name: "c".into(),
            max_retries: 1,
            retry_initial: 0.001,
            retry_max: 0.002,
            breaker_threshold: 2,
            breaker_cooldown: 0.2,
            batch_max_records: 1,
            queue_max_records: 5,
            ..Default::default()
        };
        let target = Target::Controlled(ControlledConfig {
            control_file: ctl.to_string_lossy().into(),
            output_file: out.to_string_lossy().into(),
        });
        let core = Core::start(
            vec![spec(target, common)],
            PipelineOptions::default(),
            quiet(),
        );
        for i in 0..8 {
            core.submit(Record::new(i, "X", 20, Kind::App, format!("m{i}")).finish(100));
        }
        // Two rounds of two attempts open the breaker; nothing is dropped but what found
        // the queue full.
        let pending = core.flush(Duration::from_millis(300)).unwrap_err();
        assert_eq!(pending, vec![("c".to_owned(), 5)]);
        let s = &core.stats()[0].1;
        assert_eq!(s.breaker, "open");
        assert_eq!(s.counters.dropped[DropReason::QueueFull as usize], 3);
        assert_eq!(s.counters.dropped_total(), 3);
        assert_eq!(s.in_flight, 5);
        std::fs::write(&ctl, "ok").unwrap();
        core.flush(Duration::from_secs(5)).unwrap();
        let s = &core.stats()[0].1;
        assert_eq!((s.breaker, s.counters.written), ("closed", 5));
        let lines = std::fs::read_to_string(&out).unwrap();
        let first: Vec<_> = lines.lines().filter(|l| l.contains("\"m0\"")).collect();
        assert_eq!(first.len(), 1, "the held batch is written once");
        core.close(Duration::from_secs(5)).unwrap();
    }

    #[test]
    fn records_held_at_close_are_spilled_and_replayed_by_the_next_start() {
        let tmp = crate::scratch::ScratchDir::new().unwrap();
        let ctl = tmp.path().join("ctl");
        std::fs::write(&ctl, "fail").unwrap();
        let out = tmp.path().join("out");
        let spill = tmp.path().join("spill");
        std::fs::create_dir(&spill).unwrap();
        let target = Target::Controlled(ControlledConfig {
            control_file: ctl.to_string_lossy().into(),
            output_file: out.to_string_lossy().into(),
        });
        let common = Common {
            name: "c".into(),
            max_retries: 0,
            breaker_threshold: 1,
            breaker_cooldown: 60.0,
            batch_max_delay: 0.01,
            ..Default::default()
        };
        let options = PipelineOptions {
            spill_dir: Some(spill.to_string_lossy().into()),
            ..Default::default()
        };
        let start = || {
            Core::start(
                vec![spec(target.clone(), common.clone())],
                options.clone(),
                quiet(),
            )
        };
        let core = start();
        for i in 0..10 {
            core.submit(Record::new(i, "X", 20, Kind::App, format!("m{i}")).finish(100));
        }
        assert!(core.close(Duration::from_millis(200)).is_err());
        let c = &core.stats()[0].1.counters;
        assert_eq!((c.spilled, c.dropped_total(), c.written), (10, 0, 0));
        assert_eq!(std::fs::read_dir(&spill).unwrap().count(), 1);

        std::fs::write(&ctl, "ok").unwrap();
        let core = start();
        core.replay_first();
        core.flush(Duration::from_secs(5)).unwrap();
        core.close(Duration::from_secs(5)).unwrap();
        let c = &core.stats()[0].1.counters;
        assert_eq!((c.replayed, c.written, c.accepted), (10, 10, 10));
        assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 10);
        assert_eq!(std::fs::read_dir(&spill).unwrap().count(), 0);
    }

    #[test]
    fn a_long_outage_is_reported_at_doubling_intervals() {
        let t0 = Instant::now();
        let mut r = OutageReports::new();
        // Before the breaker opens, retries are the rate limit's business.
        assert!(matches!(r.failed(t0), Report::RateLimited));
        r.opened(t0);
        // Ten hours of failed probes, one every 10 s (the default breaker cooldown).
        let probes = 6 * 60 * 10;
        let (mut minutes, mut counted) = (Vec::new(), 0);
        for i in 1..=probes {
            match r.failed(t0 + Duration::from_secs(10 * i)) {
                Report::Due(unreported) => {
                    minutes.push(i / 6);
                    counted += unreported + 1;
                }
                Report::Quiet => {}
                Report::RateLimited => panic!("the breaker is open"),
            }
        }
        assert_eq!(
            minutes,
            [1, 3, 7, 15, 31, 63, 123, 183, 243, 303, 363, 423, 483, 543],
            "14 reports in ten hours, not 3,600"
        );
        // Every failed probe is in one report's count, or waiting for the next.
        assert_eq!(counted + r.unreported, probes);
        // A new opening (the next outage) starts the schedule over.
        let t1 = t0 + Duration::from_secs(10 * probes + 5);
        r.opened(t1);
        assert!(matches!(
            r.failed(t1 + Duration::from_secs(59)),
            Report::Quiet
        ));
        assert!(matches!(
            r.failed(t1 + Duration::from_secs(60)),
            Report::Due(1)
        ));
    }

    #[test]
    fn a_refused_batch_is_dropped_and_the_next_written() {
        let tmp = crate::scratch::ScratchDir::new().unwrap();
        let ctl = tmp.path().join("ctl");
        std::fs::write(&ctl, "fail_permanent").unwrap();
        let target = Target::Controlled(ControlledConfig {
            control_file: ctl.to_string_lossy().into(),
            output_file: tmp.path().join("out").to_string_lossy().into(),
        });
        let common = Common {
            name: "c".into(),
            max_retries: 5,
            ..Default::default()
        };
        let core = Core::start(
            vec![spec(target, common)],
            PipelineOptions::default(),
            quiet(),
        );
        core.submit(Record::new(0, "X", 20, Kind::App, "m".into()).finish(100));
        core.flush(Duration::from_secs(5)).unwrap();
        std::fs::write(&ctl, "ok").unwrap();
        core.submit(Record::new(1, "X", 20, Kind::App, "m".into()).finish(100));
        core.flush(Duration::from_secs(5)).unwrap();
        let c = &core.stats()[0].1.counters;
        assert_eq!(
            (c.dropped[DropReason::Failed as usize], c.retries, c.written),
            (1, 0, 1)
        );
        core.close(Duration::from_secs(5)).unwrap();
    }
}
