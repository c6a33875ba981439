//! COMMAND out, COMMAND_RESULT in. Delivery is at least once: every open
//! command is sent on each new connection; the store's status rules make a
//! repeated result harmless.

use furrow_proto::{CommandResult, Message, Str};

use crate::session::machine::{Effect, Machine};
use crate::store::{CommandOutcome, CommandRecord};

impl Machine {
    /// The device's open commands (read after a wake-up): sends those this
    /// connection has not sent yet, and asks for them to be marked
    /// delivered.
    pub fn commands_due(&mut self, open: Vec<CommandRecord>) {
        let mut fresh = Vec::new();
        for c in open {
            if self.sent_commands.contains(&c.id) {
                continue;
            }
            self.out.queue(&Message::Command(furrow_proto::Command {
                command_id: c.id,
                name: Str::from(c.name.as_str()),
                content_type: c.content_type,
                payload: c.payload.into(),
            }));
            self.sent_commands.push(c.id);
            fresh.push(c.id);
        }
        if !fresh.is_empty() {
            self.effects.push(Effect::MarkDelivered(fresh));
        }
    }

    pub(in crate::session) fn on_command_result(&mut self, r: CommandResult) {
        self.sent_commands.retain(|id| *id != r.command_id);
        self.effects.push(Effect::CompleteCommand {
            device: self.id.key,
            command_id: r.command_id,
            outcome: CommandOutcome {
                status: r.status as u8,
                content_type: r.content_type,
                payload: r.payload.to_vec(),
            },
        });
    }
}
