//! Firmware transfer (capability FIRMWARE): FIRMWARE_OFFER out when the
//! device's firmware job wants it and a download slot is free,
//! CHUNK_REQUEST in, CHUNK out (a slice of the image in memory and its
//! CRC-32), FIRMWARE_CANCEL when the offer is withdrawn or a request names
//! an image not on offer here.
//!
//! Scheduling: a request is answered as soon as the instance's firmware
//! pace (`firmware.max_bytes_per_s`, all sessions together) allows, into
//! the same outbox as ACKs, and only while that outbox holds less than
//! `limits.max_unsent_bytes`. Requests waiting for the pace are held (at
//! most the offer's window: past it the session stops reading, so a device
//! that asks for more is slowed, never buffered for). So a downloading
//! device's own ACKs wait behind at most `max_unsent_bytes` plus one chunk,
//! and a rollout takes at most the paced share of the gateway's CPU and
//! uplink, whatever the number of devices: the rest stays telemetry's.

use std::collections::VecDeque;
use std::sync::Arc;

use furrow_proto::{Chunk, ChunkRequest, ErrorCode, FirmwareOffer, Message, Str};
use tokio::time::Instant;

use crate::firmware::serve::{Image, Pace, SlotGuard};
use crate::session::machine::{End, Fatal, Machine};

/// An offer standing on this connection.
#[derive(Debug)]
pub struct Transfer {
    /// The image.
    pub image: Arc<Image>,
    /// The job it is for.
    pub job: u64,
    /// The download slot, held until the image's last byte has been sent.
    pub slot: Option<SlotGuard>,
    /// The offer's `chunk_max`.
    pub chunk_max: u32,
    /// The offer's `window`: requests held at most.
    pub window: u16,
    /// The instance's firmware byte rate.
    pub pace: Arc<Pace>,
    /// Checked requests waiting for the pace, in order.
    pub pending: VecDeque<ChunkRequest>,
    /// The turn the pace gave the first of them, once booked.
    pub booked: Option<Instant>,
    /// When the driver must look again (that turn, while it is ahead).
    pub due: Option<Instant>,
}

/// How an offer is made: the image, its job and slot, and the terms.
pub struct OfferTerms {
    /// The job it is for.
    pub job: u64,
    /// The download slot taken for it.
    pub slot: SlotGuard,
    /// `chunk_max` to announce.
    pub chunk_max: u32,
    /// `window` to announce.
    pub window: u16,
    /// The instance's firmware byte rate.
    pub pace: Arc<Pace>,
}

impl Machine {
    /// Whether the device takes firmware updates.
    pub fn has_firmware(&self) -> bool {
        self.caps & furrow_proto::CAP_FIRMWARE != 0
    }

    /// The image on offer here, if any.
    pub fn firmware_offered(&self) -> Option<&str> {
        self.firmware.as_ref().map(|t| t.image.record.id.as_str())
    }

    /// Offers `image` (replacing any earlier offer).
    pub fn firmware_offer(&mut self, image: Arc<Image>, terms: OfferTerms) {
        self.out.queue(&Message::FirmwareOffer(FirmwareOffer {
            image: image.id,
            size: image.record.size,
            chunk_max: terms.chunk_max,
            window: terms.window,
            signature: image.signature,
            model: Str::from(image.record.model.as_str()),
            version: Str::from(image.record.version.as_str()),
        }));
        metrics::counter!("furrow_firmware_offers_total").increment(1);
        self.firmware = Some(Box::new(Transfer {
            image,
            job: terms.job,
            slot: Some(terms.slot),
            chunk_max: terms.chunk_max,
            window: terms.window,
            pace: terms.pace,
            pending: VecDeque::new(),
            booked: None,
            due: None,
        }));
    }

    /// Whether the session may read another frame as far as firmware goes:
    /// fewer requests held than the offer's window.
    pub(in crate::session) fn firmware_room(&self) -> bool {
        self.firmware
            .as_ref()
            .is_none_or(|t| t.pending.len() < usize::from(t.window))
    }

    /// When held requests may be served (the pace's due time).
    pub(in crate::session) fn firmware_due(&self) -> Option<Instant> {
        self.firmware.as_ref().and_then(|t| t.due)
    }

    /// The transport wrote what the outbox held: serve requests that were
    /// held for room in it (a request held for the pace has its timer).
    pub fn on_flushed(&mut self, now: Instant) {
        let waiting = self
            .firmware
            .as_ref()
            .is_some_and(|t| t.due.is_none() && !t.pending.is_empty());
        if waiting && self.end.is_none() && !self.draining {
            self.serve_chunks(now);
        }
    }

    /// Serves held requests as far as the pace and the outbox allow.
    pub(in crate::session) fn serve_chunks(&mut self, now: Instant) {
        let max_unsent = self.limits.max_unsent;
        let Some(t) = self.firmware.as_mut() else {
            return;
        };
        t.due = None;
        while let Some(r) = t.pending.front().copied() {
            if self.out.len() >= max_unsent {
                // The driver comes back once the socket took some.
                break;
            }
            let at = match t.booked {
                Some(at) => at,
                None => {
                    let at = t.pace.reserve(u64::from(r.length), now);
                    if at > now {
                        metrics::counter!("furrow_firmware_paced_total").increment(1);
                    }
                    t.booked = Some(at);
                    at
                }
            };
            if at > now {
                t.due = Some(at);
                break;
            }
            t.booked = None;
            t.pending.pop_front();
            let size = t.image.record.size;
            let end = r.offset + u64::from(r.length);
            // Checked against the image in memory: the casts cannot truncate.
            let data = t.image.bytes.slice(r.offset as usize..end as usize);
            let crc32 = crc32fast::hash(&data);
            if end == size {
                // Every byte has been sent once: the slot goes to the next
                // device (a range fetched again is still served).
                t.slot = None;
            }
            metrics::counter!("furrow_firmware_bytes_sent_total").increment(u64::from(r.length));
            self.out.queue(&Message::Chunk(Chunk {
                image: r.image,
                offset: r.offset,
                crc32,
                data,
            }));
        }
    }

    /// The device's job no longer wants an image: withdraw the offer.
    pub fn firmware_withdraw(&mut self) {
        if let Some(t) = self.firmware.take() {
            self.out
                .queue(&Message::FirmwareCancel { image: t.image.id });
        }
    }

    pub(in crate::session) fn on_chunk_request(&mut self, r: ChunkRequest) {
        let Some(t) = self.firmware.as_mut().filter(|t| t.image.id == r.image) else {
            metrics::counter!("furrow_firmware_requests_refused_total", "reason" => "not_offered")
                .increment(1);
            self.out.queue(&Message::FirmwareCancel { image: r.image });
            return;
        };
        let size = t.image.record.size;
        let end = r.offset.checked_add(u64::from(r.length));
        if !end.is_some_and(|e| e <= size && r.length <= t.chunk_max) {
            metrics::counter!("furrow_firmware_requests_refused_total", "reason" => "range")
                .increment(1);
            let m = format!(
                "CHUNK_REQUEST {}+{} is outside the image ({size} bytes) or over chunk_max {}",
                r.offset, r.length, t.chunk_max
            );
            return self.end_firmware(m);
        }
        t.pending.push_back(r);
        self.serve_chunks(self.frame_time);
    }

    fn end_firmware(&mut self, m: String) {
        self.end
            .get_or_insert(End::Fatal(Fatal(ErrorCode::ProtocolError, m)));
    }
}
