//! Firmware transfer (capability FIRMWARE): FIRMWARE_OFFER out when the
//! device's firmware job wants it and a download slot is free,
//! CHUNK_REQUEST in, CHUNK out (a slice of the image in memory and its
//! CRC-32), FIRMWARE_CANCEL when the offer is withdrawn or a request names
//! an image not on offer here.
//!
//! Scheduling: a request is answered as soon as it is read, into the same
//! outbox as ACKs, and the session reads no more frames while the outbox
//! holds `limits.max_unsent_bytes` or more; so a downloading device's ACKs
//! wait behind at most that much plus one chunk, and a device pulling
//! faster than its socket drains is slowed by TCP, never buffered for.

use std::sync::Arc;

use furrow_proto::{Chunk, ChunkRequest, ErrorCode, FirmwareOffer, Message, Str};

use crate::firmware::serve::{Image, SlotGuard};
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

    /// Offers `image` for `job` (replacing any earlier offer), with a slot.
    pub fn firmware_offer(
        &mut self,
        image: Arc<Image>,
        job: u64,
        slot: SlotGuard,
        chunk_max: u32,
        window: u16,
    ) {
        self.out.queue(&Message::FirmwareOffer(FirmwareOffer {
            image: image.id,
            size: image.record.size,
            chunk_max,
            window,
            signature: image.signature,
            model: Str::from(image.record.model.as_str()),
            version: Str::from(image.record.version.as_str()),
        }));
        metrics::counter!("furrow_firmware_offers_total").increment(1);
        self.firmware = Some(Box::new(Transfer {
            image,
            job,
            slot: Some(slot),
            chunk_max,
        }));
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
        let Some(end) = end.filter(|&e| e <= size && r.length <= t.chunk_max) else {
            metrics::counter!("furrow_firmware_requests_refused_total", "reason" => "range")
                .increment(1);
            let m = format!(
                "CHUNK_REQUEST {}+{} is outside the image ({size} bytes) or over chunk_max {}",
                r.offset, r.length, t.chunk_max
            );
            return self.end_firmware(m);
        };
        // In range of an image held in memory: the casts cannot truncate.
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

    fn end_firmware(&mut self, m: String) {
        self.end
            .get_or_insert(End::Fatal(Fatal(ErrorCode::ProtocolError, m)));
    }
}
