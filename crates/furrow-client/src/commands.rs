//! Commands from the gateway: the application's handler, and the memory of
//! recently answered command ids that makes at-least-once delivery safe
//! (a repeated COMMAND gets the same answer, without running again).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use furrow_proto::CommandStatus;

/// A command received from the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// Its id (the same on redelivery).
    pub id: u64,
    /// Its name.
    pub name: String,
    /// Content type byte of the payload.
    pub content_type: u8,
    /// Arguments.
    pub payload: Bytes,
}

/// The application's answer to a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandReply {
    /// Outcome.
    pub status: CommandStatus,
    /// Content type byte of the payload.
    pub content_type: u8,
    /// Result data.
    pub payload: Bytes,
}

impl CommandReply {
    /// Success with a payload.
    pub fn ok(content_type: u8, payload: impl Into<Bytes>) -> Self {
        Self {
            status: CommandStatus::Succeeded,
            content_type,
            payload: payload.into(),
        }
    }

    /// Failure with a UTF-8 text reason.
    pub fn failed(reason: impl Into<String>) -> Self {
        Self {
            status: CommandStatus::Failed,
            content_type: furrow_proto::ContentType::Text as u8,
            payload: Bytes::from(reason.into()),
        }
    }

    /// The device does not know this command.
    pub fn unknown() -> Self {
        Self {
            status: CommandStatus::UnknownCommand,
            content_type: 0,
            payload: Bytes::new(),
        }
    }
}

/// A boxed future returned by a handler.
pub type ReplyFuture = Pin<Box<dyn Future<Output = CommandReply> + Send>>;

/// Handles commands: an async closure `Fn(Command) -> impl Future<Output =
/// CommandReply>`.
pub type Handler = Arc<dyn Fn(Command) -> ReplyFuture + Send + Sync>;

/// Wraps an async closure as a [`Handler`].
pub fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Command) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = CommandReply> + Send + 'static,
{
    Arc::new(move |c| Box::pin(f(c)))
}

/// What the client knows about a command id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// Never seen (or forgotten): run the handler.
    New,
    /// The handler is running: answer when it finishes.
    Running,
    /// Answered before: answer the same again.
    Done(CommandReply),
}

/// The last `capacity` command ids and their answers.
#[derive(Debug)]
pub struct Recent {
    capacity: usize,
    order: VecDeque<u64>,
    state: HashMap<u64, Option<CommandReply>>,
}

impl Recent {
    /// Remembers up to `capacity` command ids.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            order: VecDeque::new(),
            state: HashMap::new(),
        }
    }

    /// Looks `id` up; a new id is recorded as running.
    pub fn begin(&mut self, id: u64) -> Seen {
        match self.state.get(&id) {
            Some(Some(reply)) => Seen::Done(reply.clone()),
            Some(None) => Seen::Running,
            None => {
                if self.order.len() == self.capacity {
                    if let Some(old) = self.order.pop_front() {
                        self.state.remove(&old);
                    }
                }
                self.order.push_back(id);
                self.state.insert(id, None);
                Seen::New
            }
        }
    }

    /// Records the answer to `id`.
    pub fn finish(&mut self, id: u64, reply: CommandReply) {
        if let Some(slot) = self.state.get_mut(&id) {
            *slot = Some(reply);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_get_the_same_answer_and_memory_is_bounded() {
        let mut r = Recent::new(2);
        assert_eq!(r.begin(1), Seen::New);
        assert_eq!(r.begin(1), Seen::Running);
        r.finish(1, CommandReply::ok(3, "done"));
        assert_eq!(r.begin(1), Seen::Done(CommandReply::ok(3, "done")));
        assert_eq!(r.begin(2), Seen::New);
        assert_eq!(r.begin(3), Seen::New);
        assert_eq!(r.begin(1), Seen::New, "oldest forgotten beyond capacity");
    }
}
