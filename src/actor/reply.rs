//! How answers reach callers: a [`Durable`] answer is handed out only once its changes (and
//! every change before them) are durable, through one replier task on the actor's thread; a
//! [`Tagged`] request (from a pipeline) is answered to its pipeline's queue instead.

use actix::prelude::*;
use tokio::sync::oneshot;

use super::messages::{Ack, Answer};
use crate::actor::committer::{Group, Intake};
use crate::actor::error::ContextError;

/// A request's answer, sent once its changes (and every change before them) are durable.
///
/// Its changes are queued for the committer as soon as the handler returns. The reply is
/// sent to actix's reply channel by the actor's replier task, not by whoever hands out the
/// answer: sending it straight from there (the committer's thread, or the task that hands
/// out a group's answers) made the caller's futures re-poll in lock step, and W1's records
/// took 4.5 s instead of 0.45 s.
pub struct Durable<T> {
    pub(super) outcome: Result<(Option<u64>, T), ContextError>,
    pub(super) staged: Group,
    pub(super) intake: Option<Intake>,
    /// Where the reply goes to be sent, by the actor's replier task.
    pub(super) replier: Option<Replier>,
    pub(super) map_commit_error: Box<dyn FnOnce(ContextError) -> ContextError + Send>,
    /// For a retry of an applied request whose first answer can be read back from the log (a
    /// take's artifact): turns "already applied" into that answer, on a thread of its own
    /// once everything before the retry is durable (a walk of the log must not hold up the
    /// committer, on whose thread durability is announced).
    pub(super) recover: Option<Recover>,
}

/// See [`Durable::recover`].
pub(super) type Recover = Box<dyn FnOnce(ContextError) -> ContextError + Send>;

/// A reply ready to be sent, and the queue of the one task on the actor's thread that sends
/// them: replies reach actix's reply channels from that task, after the answers of a whole
/// group have been handed out (see [`Durable`]), at the cost of one queue push per reply,
/// not one task and one channel per request.
pub(super) type Reply = Box<dyn FnOnce() + Send>;
pub(super) type Replier = tokio::sync::mpsc::UnboundedSender<Reply>;

impl<T: Send + 'static> Durable<T> {
    /// Queues the staged changes; `reply` gets the answer once they are durable.
    pub(super) fn send(self, reply: impl FnOnce(Answer<T>) + Send + 'static) {
        let Durable {
            outcome,
            staged,
            intake,
            replier: _,
            map_commit_error,
            recover,
        } = self;
        match (outcome, intake) {
            // A retry of an applied request waits for what was staged before it, the first
            // one included: "already applied" is never said of a change not yet durable.
            (Err(refusal @ ContextError::AlreadyApplied { .. }), Some(intake)) => intake.push(
                staged,
                Box::new(move |r| match (r, recover) {
                    (Err(e), _) => reply(Err(map_commit_error(e))),
                    (Ok(()), None) => reply(Err(refusal)),
                    (Ok(()), Some(recover)) => recover_apart(refusal, recover, reply),
                }),
            ),
            (Err(e), _) => reply(Err(e)),
            (Ok(_), None) => reply(Err(ContextError::Closed)),
            (Ok((seq, value)), Some(intake)) => intake.push(
                staged,
                Box::new(move |r| reply(r.map(|()| Ack { seq, value }).map_err(map_commit_error))),
            ),
        }
    }

    /// The answer as a future (for the actor's own use).
    pub(super) fn into_future(self) -> impl std::future::Future<Output = Answer<T>> {
        let (tx, rx) = oneshot::channel();
        self.send(move |a| {
            let _ = tx.send(a);
        });
        async move { rx.await.unwrap_or(Err(ContextError::Closed)) }
    }
}

/// Runs `recover` on a thread of its own and answers with what it gives; if no thread can be
/// started, answers plain "already applied" rather than not at all.
fn recover_apart<T: Send + 'static>(
    refusal: ContextError,
    recover: Recover,
    reply: impl FnOnce(Answer<T>) + Send + 'static,
) {
    let job = std::sync::Arc::new(std::sync::Mutex::new(Some((refusal, recover, reply))));
    let on_thread = job.clone();
    let spawned = std::thread::Builder::new()
        .name("pcx-audit".into())
        .spawn(move || {
            let taken = on_thread.lock().ok().and_then(|mut j| j.take());
            if let Some((refusal, recover, reply)) = taken {
                reply(Err(recover(refusal)));
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start a thread to read a retried request's first answer");
        let taken = job.lock().ok().and_then(|mut j| j.take());
        if let Some((refusal, _, reply)) = taken {
            reply(Err(refusal));
        }
    }
}

impl<T: Send + 'static> Durable<T> {
    /// Like [`Durable::send`], with `deliver` run by the actor's replier task.
    pub(super) fn reply_with(self, deliver: impl FnOnce(Answer<T>) + Send + 'static) {
        let replier = self.replier.clone();
        self.send(move |answer| {
            let reply: Reply = Box::new(move || deliver(answer));
            match &replier {
                Some(r) => {
                    if let Err(unsent) = r.send(reply) {
                        // The replier is gone (the actor stopped): send from here.
                        (unsent.0)();
                    }
                }
                None => reply(),
            }
        });
    }
}

/// Where a pipelined request's answer goes: the pipeline's queue, with the request's tag.
/// An answer dropped unsent (the request never handled: the actor stopped) still arrives, as
/// [`ContextError::Closed`], so a pipeline never waits for an answer that cannot come.
pub struct TaggedReply<T: Send + 'static> {
    pub(super) tag: u64,
    pub(super) to: Option<tokio::sync::mpsc::UnboundedSender<(u64, Answer<T>)>>,
}

impl<T: Send + 'static> TaggedReply<T> {
    pub(super) fn answer(mut self, answer: Answer<T>) {
        if let Some(to) = self.to.take() {
            // A pipeline that was dropped takes no answers.
            let _ = to.send((self.tag, answer));
        }
    }
}

impl<T: Send + 'static> Drop for TaggedReply<T> {
    fn drop(&mut self) {
        if let Some(to) = self.to.take() {
            let _ = to.send((self.tag, Err(ContextError::Closed)));
        }
    }
}

/// A request sent through a [`crate::context::Pipeline`]: answered to the pipeline's queue
/// instead of to a future of its own.
pub struct Tagged<M, T: Send + 'static> {
    pub(super) msg: M,
    pub(super) reply: TaggedReply<T>,
}

impl<M, T: Send + 'static> Tagged<M, T> {
    pub(crate) fn new(
        msg: M,
        tag: u64,
        to: tokio::sync::mpsc::UnboundedSender<(u64, Answer<T>)>,
    ) -> Self {
        Tagged {
            msg,
            reply: TaggedReply { tag, to: Some(to) },
        }
    }
}

impl<M, T: Send + 'static> Message for Tagged<M, T> {
    type Result = ();
}
