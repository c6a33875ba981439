//! The two protocols a bench device speaks, behind one small interface:
//! a handshake, a message, a ping, and the acknowledgements that come back.
//! furrow/1 acknowledges cumulatively (`ACK n` covers every seq <= n);
//! MQTT QoS 1 acknowledges each PUBLISH by its packet id.

use bytes::{Bytes, BytesMut};
use furrow_proto::message::encode_telemetry;
use furrow_proto::{ContentType, FrameDecoder, Hello, Message, Str};
use rumqttc::mqttbytes::v4::{self as mqtt, Packet};
use rumqttc::mqttbytes::{Error as MqttError, QoS};

use crate::args::Protocol;
use crate::DeviceError;

/// The largest MQTT packet this generator accepts from a broker.
const MQTT_MAX_PACKET: usize = 64 * 1024;

/// What the server granted in its handshake answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granted {
    /// Unacknowledged messages allowed (MQTT has no such grant: `u16::MAX`).
    pub max_inflight: usize,
    /// The highest seq the server stored for this device (MQTT: 0).
    pub last_seq: u64,
}

/// An acknowledgement, in the protocol's own terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// furrow/1: every seq up to and including this one.
    UpTo(u64),
    /// MQTT: the PUBLISH with this packet id.
    PacketId(u16),
}

/// One device's encoder and decoder for the chosen protocol.
pub struct Wire {
    protocol: Protocol,
    furrow: FrameDecoder,
    /// MQTT: the PUBLISH template (topic and payload), its pkid set per send.
    publish: mqtt::Publish,
    payload: Bytes,
}

/// The MQTT packet id of a seq: 1..=65535, cycling.
pub fn packet_id(seq: u64) -> u16 {
    ((seq.wrapping_sub(1) % 65_535) + 1) as u16
}

impl Wire {
    /// A wire for `device_id` sending `payload` (MQTT to `topic`).
    pub fn new(protocol: Protocol, topic: String, payload: Bytes) -> Self {
        Self {
            protocol,
            furrow: FrameDecoder::default(),
            publish: mqtt::Publish::from_bytes(topic, QoS::AtLeastOnce, payload.clone()),
            payload,
        }
    }

    /// Appends the opening message: HELLO or CONNECT (clean session).
    pub fn hello(
        &self,
        device_id: &str,
        token: &str,
        keepalive_s: u16,
        out: &mut BytesMut,
    ) -> Result<(), DeviceError> {
        match self.protocol {
            Protocol::Furrow => Message::Hello(Hello {
                version: furrow_proto::VERSION,
                keepalive_s,
                device_id: Str::from(device_id),
                token: Str::from(token),
                capabilities: None,
            })
            .encode(out)
            .map_err(|e| DeviceError::Encode(e.to_string())),
            Protocol::Mqtt => {
                let mut c = mqtt::Connect::new(device_id);
                c.keep_alive = keepalive_s;
                if !token.is_empty() {
                    c.set_login(device_id, token);
                }
                c.write(out)
                    .map(drop)
                    .map_err(|e| DeviceError::Encode(format!("{e:?}")))
            }
        }
    }

    /// Reads the handshake answer from `buf`: `Ok(None)` until it is whole.
    pub fn handshake(&mut self, buf: &mut BytesMut) -> Result<Option<Granted>, DeviceError> {
        match self.protocol {
            Protocol::Furrow => {
                let Some(frame) = self.furrow.decode(buf)? else {
                    return Ok(None);
                };
                match Message::from_frame(frame)? {
                    Message::Welcome(w) => Ok(Some(Granted {
                        max_inflight: usize::from(w.max_inflight),
                        last_seq: w.last_seq,
                    })),
                    other => Err(refusal(other)),
                }
            }
            Protocol::Mqtt => match read_mqtt(buf)? {
                None => Ok(None),
                Some(Packet::ConnAck(a)) if a.code == mqtt::ConnectReturnCode::Success => {
                    Ok(Some(Granted {
                        max_inflight: usize::from(u16::MAX),
                        last_seq: 0,
                    }))
                }
                Some(Packet::ConnAck(a)) => {
                    Err(DeviceError::Refused(format!("CONNACK {:?}", a.code)))
                }
                Some(p) => Err(DeviceError::Protocol(format!(
                    "expected CONNACK, got {p:?}"
                ))),
            },
        }
    }

    /// Appends one message with this seq.
    pub fn message(&mut self, seq: u64, out: &mut BytesMut) -> Result<(), DeviceError> {
        match self.protocol {
            Protocol::Furrow => {
                encode_telemetry(seq, 0, ContentType::Json as u8, &self.payload, out)
                    .map_err(|e| DeviceError::Encode(e.to_string()))
            }
            Protocol::Mqtt => {
                self.publish.pkid = packet_id(seq);
                self.publish
                    .write(out)
                    .map(drop)
                    .map_err(|e| DeviceError::Encode(format!("{e:?}")))
            }
        }
    }

    /// Appends a keepalive ping.
    pub fn ping(&self, out: &mut BytesMut) -> Result<(), DeviceError> {
        match self.protocol {
            Protocol::Furrow => Message::Ping { nonce: 0 }
                .encode(out)
                .map_err(|e| DeviceError::Encode(e.to_string())),
            Protocol::Mqtt => mqtt::PingReq
                .write(out)
                .map(drop)
                .map_err(|e| DeviceError::Encode(format!("{e:?}"))),
        }
    }

    /// Decodes every whole message in `buf`, handing acknowledgements to
    /// `on_ack`. Anything that ends the session is an error.
    pub fn acks(
        &mut self,
        buf: &mut BytesMut,
        mut on_ack: impl FnMut(Ack),
    ) -> Result<(), DeviceError> {
        match self.protocol {
            Protocol::Furrow => {
                while let Some(frame) = self.furrow.decode(buf)? {
                    match Message::from_frame(frame)? {
                        Message::Ack { seq } => on_ack(Ack::UpTo(seq)),
                        Message::Pong { .. } | Message::Ping { .. } => {}
                        Message::Reject(r) => return Err(DeviceError::Rejected(r.code)),
                        other => return Err(refusal(other)),
                    }
                }
            }
            Protocol::Mqtt => {
                while let Some(p) = read_mqtt(buf)? {
                    match p {
                        Packet::PubAck(a) => on_ack(Ack::PacketId(a.pkid)),
                        Packet::PingResp => {}
                        Packet::Disconnect => return Err(DeviceError::Closed),
                        p => return Err(DeviceError::Protocol(format!("unexpected {p:?}"))),
                    }
                }
            }
        }
        Ok(())
    }
}

/// Why a furrow/1 server ended or refused a session, as an error.
fn refusal(msg: Message) -> DeviceError {
    match msg {
        Message::Error(e) => DeviceError::ServerError(e.code),
        Message::Goodbye(g) => DeviceError::Goodbye(g.code),
        other => DeviceError::Protocol(format!("unexpected {:?}", other.kind())),
    }
}

fn read_mqtt(buf: &mut BytesMut) -> Result<Option<Packet>, DeviceError> {
    match mqtt::read(buf, MQTT_MAX_PACKET) {
        Ok(p) => Ok(Some(p)),
        Err(MqttError::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(DeviceError::Protocol(format!("MQTT: {e:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(p: Protocol) -> Wire {
        Wire::new(p, "t/dev".into(), Bytes::from_static(br#"{"a":1}"#))
    }

    #[test]
    fn packet_ids_cycle_through_1_to_65535() {
        assert_eq!(packet_id(1), 1);
        assert_eq!(packet_id(65_535), 65_535);
        assert_eq!(packet_id(65_536), 1);
    }

    #[test]
    fn mqtt_publish_round_trips_through_rumqttc() {
        let mut w = wire(Protocol::Mqtt);
        let mut buf = BytesMut::new();
        w.message(70_000, &mut buf).expect("encode");
        match mqtt::read(&mut buf, 1024).expect("decode") {
            Packet::Publish(p) => {
                assert_eq!(p.pkid, packet_id(70_000));
                assert_eq!(p.qos, QoS::AtLeastOnce);
                assert_eq!(p.topic, "t/dev");
                assert_eq!(&p.payload[..], br#"{"a":1}"#);
            }
            p => panic!("got {p:?}"),
        }
    }

    #[test]
    fn mqtt_acks_are_read_whole_and_split_anywhere() {
        let mut w = wire(Protocol::Mqtt);
        let mut all = BytesMut::new();
        for id in [1u16, 2, 300] {
            mqtt::PubAck::new(id).write(&mut all).expect("encode");
        }
        let mut got = Vec::new();
        let mut buf = BytesMut::new();
        for b in all.iter() {
            buf.extend_from_slice(&[*b]);
            w.acks(&mut buf, |a| got.push(a)).expect("decode");
        }
        assert_eq!(
            got,
            vec![Ack::PacketId(1), Ack::PacketId(2), Ack::PacketId(300)]
        );
    }

    #[test]
    fn furrow_handshake_refusal_is_an_error_with_its_code() {
        let mut w = wire(Protocol::Furrow);
        let mut buf = BytesMut::new();
        Message::Error(furrow_proto::ErrorMsg {
            code: 3,
            message: Str::from("bad token"),
        })
        .encode(&mut buf)
        .expect("encode");
        match w.handshake(&mut buf) {
            Err(DeviceError::ServerError(3)) => {}
            other => panic!("got {other:?}"),
        }
    }

    #[test]
    fn furrow_acks_and_reject() {
        let mut w = wire(Protocol::Furrow);
        let mut buf = BytesMut::new();
        Message::Ack { seq: 7 }.encode(&mut buf).expect("encode");
        Message::Pong { nonce: 0 }.encode(&mut buf).expect("encode");
        let mut got = Vec::new();
        w.acks(&mut buf, |a| got.push(a)).expect("decode");
        assert_eq!(got, vec![Ack::UpTo(7)]);
        Message::Reject(furrow_proto::Reject {
            seq: 8,
            code: 9,
            reason: Str::from("x"),
        })
        .encode(&mut buf)
        .expect("encode");
        assert!(matches!(
            w.acks(&mut buf, |_| {}),
            Err(DeviceError::Rejected(9))
        ));
    }
}
