//! The plugin thread: every plugin call the context makes runs here, under a deadline.
//!
//! A load's plugin calls need nothing from the actor's state: the entry has been found and its
//! contents read by the time they run. So the actor hands them to this thread and goes on to
//! its next message, and a stream of loads uses both cores instead of one (W5's plugin loads
//! cost 1.2–1.35× the same eager loads when the actor made the calls itself). The actor
//! still stages each load's event itself, in the order the loads arrived (see
//! `ContextActor::collect_loads`), so the log is what it would have been.
//!
//! One thread takes the work in order, so results come back in order and a plugin is never
//! called from two threads at once (the actor waits for this thread before any other request,
//! edits included). Jobs arrive in batches and the actor is told once per batch done: a
//! wake-up per load, each way, cost more than the plugin calls it moved. A plugin edit is
//! work for this thread too, and the actor waits for its result.
//!
//! **Deadline.** A call into a plugin cannot be cancelled in-process, so nobody waits for one
//! without a deadline: a watchdog thread looks at the call under way, and one that has not
//! returned within the deadline (`plugin_call_timeout_ms`) is abandoned. Its request is
//! answered `plugin_failed`, naming the plugin, the kind and the deadline; the plugin is
//! quarantined (every later call to it fails at once, until restart); and a new plugin thread
//! takes the work queued behind it. The stuck thread is leaked, still inside the plugin: that
//! is the price of running plugins in-process. Whatever it does if it ever returns is thrown
//! away, so a timed-out request has changed nothing. The watchdog sleeps while nothing
//! happens and wakes at most once per deadline while calls are made: watching costs a call
//! two uncontended locks and a clock read.
//!
//! **Stop.** On shutdown, [`PluginStop::stop`] abandons the call under way the same way and
//! refuses all work from then on, so no plugin can hold the process up.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::actor::error::ContextError;
use crate::plugins::kinds::{Deserialized, Kinds};
use crate::plugins::loader::{LoadedPlugin, PluginError};

/// One backend of a load: its id, its kind and its stored content.
pub struct Backend {
    pub id: String,
    pub kind: String,
    pub content: Vec<u8>,
}

/// A load's backends, to be deserialized; `ticket` says which load.
pub struct Job {
    pub ticket: u64,
    pub backends: Vec<Backend>,
}

/// A job done: its backends handed back, and their ready-to-use forms or the first failure.
/// A job abandoned in a plugin call comes back without its backends.
pub struct Done {
    pub ticket: u64,
    pub backends: Vec<Backend>,
    pub result: Result<Vec<Deserialized>, ContextError>,
}

/// A plugin edit: the named edit `op` of the plugin serving `kind`, on `content`; with no
/// `op`, a check: the plugin's `after_deserialization` must accept `content` (a record's
/// check, answered with no bytes).
pub struct EditJob {
    pub key: String,
    pub kind: String,
    pub op: Option<String>,
    pub args: Vec<u8>,
    pub content: Vec<u8>,
}

/// Runs every backend's `after_deserialization` on this thread, stopping at the first
/// failure: for loads that call no plugin (every backend `eager`, or no plugin loaded).
pub fn deserialize_all(
    kinds: &Kinds,
    backends: &[Backend],
) -> Result<Vec<Deserialized>, ContextError> {
    backends
        .iter()
        .map(|b| Ok(kinds.after_deserialization(&b.id, &b.kind, &b.content)?))
        .collect()
}

type EditReply = mpsc::Sender<Result<Vec<u8>, ContextError>>;

/// Work for the plugin thread.
enum Work {
    Load(Job),
    Edit(EditJob, EditReply),
}

/// Who waits for the work in hand: the load with this ticket, or an edit.
enum Owner {
    Load(u64),
    Edit(EditReply),
}

/// The plugin call under way.
struct Call {
    started: Instant,
    plugin: Arc<LoadedPlugin>,
    kind: String,
}

/// The work in hand, and the call it is making.
struct Current {
    owner: Owner,
    call: Option<Call>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Work>,
    current: Option<Current>,
    /// The worker allowed to go on; one of an earlier generation was abandoned in a call,
    /// and whatever it does if the call returns is thrown away.
    generation: u64,
    /// The handle was dropped: the threads end.
    closed: bool,
    /// Work is refused (shutdown, or no worker could be started).
    stopped: Option<ContextError>,
    worker_sleeping: bool,
}

/// What the threads share.
struct Crew {
    state: Mutex<State>,
    /// The worker waits here for work.
    work: Condvar,
    /// The watchdog waits here (for its next look, or the end).
    watch: Condvar,
    kinds: Kinds,
    done: mpsc::Sender<Done>,
    notify: Box<dyn Fn() + Send + Sync>,
    logs: tracing::Dispatch,
}

fn lock(crew: &Crew) -> MutexGuard<'_, State> {
    // The state holds no invariant a panic elsewhere could break halfway.
    crew.state.lock().unwrap_or_else(|p| p.into_inner())
}

fn deadline_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Crew {
    /// Answers the owner of abandoned work with `error`.
    fn answer(&self, owner: Owner, error: ContextError) {
        match owner {
            Owner::Load(ticket) => {
                let _ = self.done.send(Done {
                    ticket,
                    backends: Vec::new(),
                    result: Err(error),
                });
            }
            Owner::Edit(reply) => {
                let _ = reply.send(Err(error));
            }
        }
    }

    /// Answers queued work with `error`, without doing it.
    fn refuse(&self, work: Work, error: ContextError) {
        match work {
            Work::Load(job) => {
                let _ = self.done.send(Done {
                    ticket: job.ticket,
                    backends: job.backends,
                    result: Err(error),
                });
            }
            Work::Edit(_, reply) => {
                let _ = reply.send(Err(error));
            }
        }
    }

    /// Abandons the work in hand (the worker of this generation will not answer it) and
    /// gives its owner and the call it was making.
    fn abandon(state: &mut State) -> Option<(Owner, Option<Call>)> {
        let current = state.current.take()?;
        state.generation += 1;
        Some((current.owner, current.call))
    }

    /// Stops taking work: `error` for everything queued, and for the work in hand unless
    /// its call can be named. Answers outside the lock.
    fn stop(self: &Arc<Self>, error: ContextError) {
        let (in_hand, queued) = {
            let mut s = lock(self);
            if s.stopped.is_none() {
                s.stopped = Some(error.clone());
            }
            (Crew::abandon(&mut s), std::mem::take(&mut s.queue))
        };
        if let Some((owner, call)) = in_hand {
            let e = match call {
                Some(c) => {
                    self.kinds.count_abandoned();
                    tracing::warn!(plugin = %c.plugin.name, kind = %c.kind, "plugin call abandoned: plugin calls stopped");
                    PluginError::Abandoned {
                        plugin: c.plugin.name.clone(),
                        version: c.plugin.version.clone(),
                        kind: c.kind,
                    }
                    .into()
                }
                None => error.clone(),
            };
            self.answer(owner, e);
        }
        for work in queued {
            self.refuse(work, error.clone());
        }
        self.work.notify_all();
        self.watch.notify_all();
        (self.notify)();
    }

    /// Starts a worker of `generation`.
    fn start_worker(self: &Arc<Self>, generation: u64) -> std::io::Result<()> {
        let crew = self.clone();
        std::thread::Builder::new()
            .name("pcx-plugins".into())
            .spawn(move || {
                let logs = crew.logs.clone();
                tracing::dispatcher::with_default(&logs, || crew.work_loop(generation))
            })
            .map(drop)
    }

    /// The next work, marked as in hand; `None` once this worker is to end. Tells the actor
    /// when loads were done and nothing is left.
    fn next(&self, generation: u64, loads_done: &mut bool) -> Option<Work> {
        let mut s = lock(self);
        loop {
            if s.closed || s.generation != generation {
                return None;
            }
            if let Some(work) = s.queue.pop_front() {
                let owner = match &work {
                    Work::Load(job) => Owner::Load(job.ticket),
                    Work::Edit(_, reply) => Owner::Edit(reply.clone()),
                };
                s.current = Some(Current { owner, call: None });
                return Some(work);
            }
            if std::mem::take(loads_done) {
                drop(s);
                (self.notify)();
                s = lock(self);
                continue;
            }
            s.worker_sleeping = true;
            s = self.work.wait(s).unwrap_or_else(|p| p.into_inner());
            s.worker_sleeping = false;
        }
    }

    /// Makes one plugin call, watched; `None` if this worker was abandoned meanwhile.
    fn watched<T>(
        &self,
        generation: u64,
        plugin: &Arc<LoadedPlugin>,
        kind: &str,
        call: impl FnOnce() -> Result<T, ContextError>,
    ) -> Option<Result<T, ContextError>> {
        {
            let mut s = lock(self);
            if s.generation != generation {
                return None;
            }
            if let Some(current) = s.current.as_mut() {
                current.call = Some(Call {
                    started: Instant::now(),
                    plugin: plugin.clone(),
                    kind: kind.to_string(),
                });
            }
        }
        let result = catch_unwind(AssertUnwindSafe(call)).unwrap_or_else(|panic| {
            Err(ContextError::Panicked {
                message: crate::actor::error::panic_message(&panic),
            })
        });
        let mut s = lock(self);
        if s.generation != generation {
            return None;
        }
        if let Some(current) = s.current.as_mut() {
            current.call = None;
        }
        Some(result)
    }

    /// Hands over the result of the work in hand with `answer`, unless this worker was
    /// abandoned (its work was answered for it): under the lock, so never both.
    fn deliver(&self, generation: u64, answer: impl FnOnce()) -> bool {
        let mut s = lock(self);
        if s.generation != generation {
            return false;
        }
        s.current = None;
        answer();
        true
    }

    fn work_loop(&self, generation: u64) {
        let mut loads_done = false;
        while let Some(work) = self.next(generation, &mut loads_done) {
            match work {
                Work::Load(job) => {
                    let mut ready = Vec::with_capacity(job.backends.len());
                    let mut failed = None;
                    for b in &job.backends {
                        let result = match self.kinds.plugin_for(&b.kind) {
                            // `eager`, or no plugin: nothing is called.
                            None => self
                                .kinds
                                .after_deserialization(&b.id, &b.kind, &b.content)
                                .map_err(ContextError::from),
                            Some(p) => match self.watched(generation, p, &b.kind, || {
                                Ok(self
                                    .kinds
                                    .after_deserialization(&b.id, &b.kind, &b.content)?)
                            }) {
                                Some(r) => r,
                                None => return,
                            },
                        };
                        match result {
                            Ok(d) => ready.push(d),
                            Err(e) => {
                                failed = Some(e);
                                break;
                            }
                        }
                    }
                    let result = failed.map_or(Ok(ready), Err);
                    let delivered = self.deliver(generation, || {
                        let _ = self.done.send(Done {
                            ticket: job.ticket,
                            backends: job.backends,
                            result,
                        });
                    });
                    if !delivered {
                        return;
                    }
                    loads_done = true;
                }
                Work::Edit(e, reply) => {
                    let edit = || match &e.op {
                        Some(op) => {
                            Ok(self.kinds.edit(&e.key, &e.kind, op, &e.args, &e.content)?)
                        }
                        None => {
                            self.kinds
                                .after_deserialization(&e.key, &e.kind, &e.content)?;
                            Ok(Vec::new())
                        }
                    };
                    let result = match self.kinds.plugin_for(&e.kind) {
                        None => edit(),
                        Some(p) => match self.watched(generation, p, &e.kind, edit) {
                            Some(r) => r,
                            None => return,
                        },
                    };
                    let delivered = self.deliver(generation, || {
                        let _ = reply.send(result);
                    });
                    if !delivered {
                        return;
                    }
                }
            }
        }
    }

    /// The watchdog: abandons a call that has run past the deadline and starts a new worker
    /// for the work behind it. It looks when the call under way would be due, or a deadline
    /// from now when there is none: a call started since is due no earlier than that.
    fn watch_loop(self: &Arc<Self>) {
        let deadline = self.kinds.call_timeout();
        let mut s = lock(self);
        loop {
            if s.closed || s.stopped.is_some() {
                return;
            }
            let now = Instant::now();
            let overdue =
                |c: &mut Current| c.call.as_ref().is_some_and(|c| now >= c.started + deadline);
            let Some(Current {
                owner,
                call: Some(call),
            }) = s.current.take_if(overdue)
            else {
                let due = match s.current.as_ref().and_then(|c| c.call.as_ref()) {
                    Some(call) => call.started + deadline,
                    None => now + deadline,
                };
                s = self
                    .watch
                    .wait_timeout(s, due.saturating_duration_since(now))
                    .map(|(s, _)| s)
                    .unwrap_or_else(|p| p.into_inner().0);
                continue;
            };
            // The stuck worker is abandoned: it will neither answer nor take more work.
            s.generation += 1;
            let generation = s.generation;
            drop(s);
            self.kinds.quarantine(&call.kind);
            self.kinds.count_abandoned();
            let error = PluginError::TimedOut {
                plugin: call.plugin.name.clone(),
                version: call.plugin.version.clone(),
                kind: call.kind,
                deadline_ms: deadline_ms(deadline),
            };
            tracing::error!(error = %error, "plugin call abandoned; its thread is left behind");
            self.answer(owner, error.into());
            if let Err(e) = self.start_worker(generation) {
                tracing::error!(error = %e, "cannot start a new plugin thread: plugin calls fail from now on");
                self.stop(
                    PluginError::NoThread {
                        message: e.to_string(),
                    }
                    .into(),
                );
                return;
            }
            (self.notify)();
            s = lock(self);
        }
    }
}

/// The plugin thread, its watchdog and their queues.
pub struct Deserializer {
    crew: Arc<Crew>,
    done: mpsc::Receiver<Done>,
}

/// Stops plugin calls from anywhere (a signal-watching thread, say), even while the actor
/// waits for one. Cheap to clone.
#[derive(Clone)]
pub struct PluginStop {
    crew: Arc<Crew>,
}

impl PluginStop {
    /// Abandons the call under way (its request is answered `plugin_failed`) and refuses
    /// all plugin work from now on (answered `closed`).
    pub fn stop(&self) {
        self.crew.stop(ContextError::Closed);
    }
}

impl Deserializer {
    /// Starts the plugin thread and its watchdog, with the deadline of `kinds`. `notify` is
    /// called each time loads are done and nothing is left, so the actor collects the
    /// results even when no other message wakes it.
    pub fn start(kinds: Kinds, notify: impl Fn() + Send + Sync + 'static) -> std::io::Result<Self> {
        let (outbox, done) = mpsc::channel::<Done>();
        let crew = Arc::new(Crew {
            state: Mutex::default(),
            work: Condvar::new(),
            watch: Condvar::new(),
            kinds,
            done: outbox,
            notify: Box::new(notify),
            // Plugin errors are logged where the actor logs.
            logs: tracing::dispatcher::get_default(|d| d.clone()),
        });
        crew.start_worker(0)?;
        let watchdog = crew.clone();
        let started = std::thread::Builder::new()
            .name("pcx-plugin-watch".into())
            .spawn(move || {
                let logs = watchdog.logs.clone();
                tracing::dispatcher::with_default(&logs, || watchdog.watch_loop())
            });
        if let Err(e) = started {
            // Without a watchdog, no call may start: it could never be abandoned.
            lock(&crew).closed = true;
            crew.work.notify_all();
            return Err(e);
        }
        Ok(Deserializer { crew, done })
    }

    /// Queues jobs, done in order; gives them back if plugin calls are stopped.
    pub fn submit(&self, batch: Vec<Job>) -> Result<(), Vec<Job>> {
        let mut s = lock(&self.crew);
        if s.stopped.is_some() || s.closed {
            return Err(batch);
        }
        s.queue.extend(batch.into_iter().map(Work::Load));
        if s.worker_sleeping {
            self.crew.work.notify_one();
        }
        Ok(())
    }

    /// Runs a plugin edit on the plugin thread and waits for it: at most the deadline, after
    /// which the watchdog answers for it.
    pub fn edit(&self, job: EditJob) -> Result<Vec<u8>, ContextError> {
        let (reply, result) = mpsc::channel();
        {
            let mut s = lock(&self.crew);
            if let Some(e) = &s.stopped {
                return Err(e.clone());
            }
            if s.closed {
                return Err(ContextError::Closed);
            }
            s.queue.push_back(Work::Edit(job, reply));
            if s.worker_sleeping {
                self.crew.work.notify_one();
            }
        }
        // Every edit queued is answered: by the worker, the watchdog, or `stop`.
        result.recv().unwrap_or(Err(ContextError::Closed))
    }

    /// A finished job, if there is one.
    pub fn try_done(&self) -> Result<Done, mpsc::TryRecvError> {
        self.done.try_recv()
    }

    /// The next finished job, waiting for it: every job queued is answered, by the worker,
    /// the watchdog (within the deadline) or [`PluginStop::stop`].
    pub fn wait_done(&self) -> Result<Done, mpsc::RecvError> {
        self.done.recv()
    }

    /// A handle that stops plugin calls.
    pub fn stopper(&self) -> PluginStop {
        PluginStop {
            crew: self.crew.clone(),
        }
    }
}

impl Drop for Deserializer {
    fn drop(&mut self) {
        // The threads end after the work in hand; a worker stuck in a plugin is not waited
        // for.
        let mut s = lock(&self.crew);
        s.closed = true;
        s.queue.clear();
        drop(s);
        self.crew.work.notify_all();
        self.crew.watch.notify_all();
    }
}
