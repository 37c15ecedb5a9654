//! The plugin thread: runs loads' `after_deserialization` beside the actor.
//!
//! A load's plugin calls need nothing from the actor's state: the entry has been found and its
//! contents read by the time they run. So the actor hands them to this thread and goes on to
//! its next message, and a stream of loads uses both cores instead of one (W5's plugin loads
//! cost 1.2–1.35× the same eager loads when the actor made the calls itself). The actor
//! still stages each load's event itself, in the order the loads arrived (see
//! `ContextActor::collect_loads`), so the log is what it would have been.
//!
//! One thread takes the jobs in order, so results come back in order and a plugin is never
//! called from two threads at once (the actor waits for this thread before any other request,
//! edits included). Jobs arrive in batches and the actor is told once per batch done: a
//! wake-up per load, each way, cost more than the plugin calls it moved.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::thread::JoinHandle;

use crate::error::ContextError;
use crate::kinds::{Deserialized, Kinds};

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
pub struct Done {
    pub ticket: u64,
    pub backends: Vec<Backend>,
    pub result: Result<Vec<Deserialized>, ContextError>,
}

/// Runs every backend's `after_deserialization`, stopping at the first failure.
pub fn deserialize_all(
    kinds: &Kinds,
    backends: &[Backend],
) -> Result<Vec<Deserialized>, ContextError> {
    backends
        .iter()
        .map(|b| kinds.after_deserialization(&b.id, &b.kind, &b.content))
        .collect()
}

/// The thread and its two queues.
pub struct Deserializer {
    jobs: Option<mpsc::Sender<Vec<Job>>>,
    done: mpsc::Receiver<Done>,
    thread: Option<JoinHandle<()>>,
}

impl Deserializer {
    /// Starts the thread. `notify` is called each time it has finished everything it was
    /// given, so the actor collects the results even when no other message wakes it.
    pub fn start(kinds: Kinds, notify: impl Fn() + Send + 'static) -> std::io::Result<Self> {
        let (jobs, inbox) = mpsc::channel::<Vec<Job>>();
        let (outbox, done) = mpsc::channel::<Done>();
        // Plugin errors are logged where the actor logs.
        let logs = tracing::dispatcher::get_default(|d| d.clone());
        let thread = std::thread::Builder::new()
            .name("pcx-plugins".into())
            .spawn(move || {
                tracing::dispatcher::with_default(&logs, || {
                    while let Ok(mut batch) = inbox.recv() {
                        loop {
                            for job in batch {
                                let result = catch_unwind(AssertUnwindSafe(|| {
                                    deserialize_all(&kinds, &job.backends)
                                }))
                                .unwrap_or_else(|panic| {
                                    Err(ContextError::Panicked {
                                        message: crate::actor::panic_message(&panic),
                                    })
                                });
                                let done = Done {
                                    ticket: job.ticket,
                                    backends: job.backends,
                                    result,
                                };
                                if outbox.send(done).is_err() {
                                    return;
                                }
                            }
                            match inbox.try_recv() {
                                Ok(next) => batch = next,
                                Err(_) => break,
                            }
                        }
                        notify();
                    }
                })
            })?;
        Ok(Deserializer {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
        })
    }

    /// Queues jobs, done in order; gives them back if the thread is gone.
    pub fn submit(&self, batch: Vec<Job>) -> Result<(), Vec<Job>> {
        match &self.jobs {
            Some(jobs) => jobs.send(batch).map_err(|e| e.0),
            None => Err(batch),
        }
    }

    /// A finished job, if there is one.
    pub fn try_done(&self) -> Result<Done, mpsc::TryRecvError> {
        self.done.try_recv()
    }

    /// The next finished job, waiting for it; an error once the thread is gone.
    pub fn wait_done(&self) -> Result<Done, mpsc::RecvError> {
        self.done.recv()
    }
}

impl Drop for Deserializer {
    fn drop(&mut self) {
        // Closing the job queue ends the thread after the job in hand.
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
