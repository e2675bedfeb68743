//! The sender's body into the ring: data is read straight into the ring's free space,
//! framing through a small buffer and the decoder.

use std::time::Instant;

use super::{Outcome, Pipe};
use crate::broadcast::Broadcast;
use crate::chunked::{BodyDecoder, BodyError};
use crate::multipart::FormDecoder;

/// How many framing bytes the sender is read for at a time; data that comes with them is
/// copied, the rest of a chunk is read straight into the buffer.
const RAW_READ: usize = 64;

/// How many bytes a form sender (`?form`) is read for at a time: all its body goes
/// through the form decoder, none straight into the ring.
const FORM_READ: usize = 16 * 1024;

/// Where the sender's next read goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadInto {
    Nowhere,
    /// Straight into the ring: chunk or body data. `all_free`: the read was lent all of
    /// the ring's free space, so filling it means the ring, not the sender, set the size
    /// of the read.
    Ring {
        lent: usize,
        all_free: bool,
    },
    /// Into `frame_in`: framing to decode first.
    Raw,
}

/// The running transfer's body: the ring every receiver reads, and what feeds it.
#[derive(Debug)]
pub(super) struct Ingest {
    pub(super) ring: Broadcast,
    decoder: BodyDecoder,
    /// Sender bytes read but not yet decoded (the leftover after its head, or framing).
    raw: Vec<u8>,
    raw_pos: usize,
    /// Lent to the backend for reads of framing.
    frame_in: Vec<u8>,
    read_into: ReadInto,
    /// Body bytes taken into the ring.
    pub(super) bytes: u64,
    /// A form sender's decoder: the body's first part is what goes into the ring.
    form: Option<FormDecoder>,
}

impl Ingest {
    pub(super) fn new(ring: Broadcast, decoder: BodyDecoder, leftover: Vec<u8>) -> Self {
        Ingest {
            ring,
            decoder,
            raw: leftover,
            raw_pos: 0,
            frame_in: vec![0; RAW_READ],
            read_into: ReadInto::Nowhere,
            bytes: 0,
            form: None,
        }
    }

    /// The body is a form (`?form`) with this boundary: only its first part's bytes go
    /// into the ring.
    pub(super) fn with_form(mut self, boundary: &str) -> Self {
        self.form = Some(FormDecoder::new(boundary));
        self.frame_in = vec![0; FORM_READ];
        self
    }

    /// A form's first part's headers (`None` if the form ended without a part), once
    /// known; `Err` while they are not, or if this body is no form.
    pub(super) fn form_head(&self) -> Result<Option<&crate::multipart::PartHead>, ()> {
        match &self.form {
            Some(f) if f.head_known() => Ok(f.first_head()),
            _ => Err(()),
        }
    }

    pub(super) fn is_done(&self) -> bool {
        self.decoder.is_done()
    }

    /// Where the sender's next read goes: straight into the ring for data, a small buffer
    /// for framing; `None` while decoded bytes wait for room or the body is whole.
    fn buf(&mut self) -> Option<&mut [u8]> {
        self.read_into = ReadInto::Nowhere;
        if self.raw_pos < self.raw.len() || self.decoder.is_done() {
            return None;
        }
        let data_left = self.decoder.data_left();
        if data_left > 0 && self.form.is_none() {
            let free = self.ring.capacity() - self.ring.buffered();
            let space = self.ring.writable();
            let k = space
                .len()
                .min(usize::try_from(data_left).unwrap_or(usize::MAX));
            if k == 0 {
                return None;
            }
            self.read_into = ReadInto::Ring {
                lent: k,
                all_free: k == free,
            };
            return Some(&mut space[..k]);
        }
        // Data read with framing is copied in, across the wrap if need be.
        let want = RAW_READ + self.form.as_ref().map_or(0, FormDecoder::held);
        if self.ring.reserve(want) < want {
            return None;
        }
        self.read_into = ReadInto::Raw;
        let k = match self.decoder.data_left() {
            // A form's body read no further than its length: what follows is not ours.
            0 => RAW_READ,
            left => usize::try_from(left).unwrap_or(usize::MAX).max(RAW_READ),
        };
        let k = k.min(self.frame_in.len());
        Some(&mut self.frame_in[..k])
    }

    /// `n` bytes were read into [`Ingest::buf`] (not 0: the caller handles the end).
    fn read(&mut self, n: usize) -> Result<(), BodyError> {
        match std::mem::replace(&mut self.read_into, ReadInto::Nowhere) {
            ReadInto::Ring { lent, all_free } => {
                self.ring.commit(n);
                if n == lent && all_free {
                    // The sender had more than the ring could take: a larger ring makes
                    // fewer, larger writes to every receiver.
                    self.ring.grow();
                }
                self.decoder.advance_data(n as u64);
                self.bytes += n as u64;
                Ok(())
            }
            ReadInto::Raw => {
                self.raw.clear();
                self.raw_pos = 0;
                let n = n.min(self.frame_in.len());
                self.raw.extend_from_slice(&self.frame_in[..n]);
                self.pump()
            }
            ReadInto::Nowhere => Ok(()),
        }
    }

    /// Decodes buffered raw sender bytes into the ring, as far as its room allows.
    fn pump(&mut self) -> Result<(), BodyError> {
        let mut result = Ok(());
        while self.raw_pos < self.raw.len() && !self.decoder.is_done() {
            // Input is never shorter than the data it holds, so `room` input bytes fit;
            // a form decoder may add the bytes of a boundary it held back.
            let held = self.form.as_ref().map_or(0, FormDecoder::held);
            let room = self.ring.reserve(self.raw.len() - self.raw_pos + held);
            if room <= held {
                break;
            }
            let end = self.raw.len().min(self.raw_pos + room - held);
            match self.decoder.decode(&self.raw[self.raw_pos..end]) {
                Ok(step) => {
                    let data =
                        &self.raw[self.raw_pos + step.data.start..self.raw_pos + step.data.end];
                    match &mut self.form {
                        None => self.bytes += self.ring.push(data) as u64,
                        Some(form) => {
                            let (ring, mut pushed) = (&mut self.ring, 0);
                            let r = form.decode(data, &mut |s| pushed += ring.push(s));
                            self.bytes += pushed as u64;
                            if let Err(e) = r {
                                result = Err(BodyError::Form(e));
                                break;
                            }
                        }
                    }
                    self.raw_pos += step.consumed;
                    if step.consumed == 0 {
                        break;
                    }
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if let (Some(form), true, Ok(())) = (&self.form, self.decoder.is_done(), &result) {
            result = form.finish().map_err(BodyError::Form);
        }
        if self.decoder.is_done() || self.raw_pos >= self.raw.len() {
            self.raw.clear();
            self.raw_pos = 0;
        }
        result
    }

    fn has_raw(&self) -> bool {
        self.raw_pos < self.raw.len()
    }
}

impl Pipe {
    pub(super) fn sender_buf(&mut self) -> Option<&mut [u8]> {
        self.body.as_mut()?.buf()
    }

    pub(super) fn sender_read(&mut self, n: usize, now: Instant) {
        let Some(body) = self.body.as_mut() else {
            return;
        };
        if n == 0 {
            if !body.is_done() {
                self.fail(Outcome::SenderGone, now);
            }
            return;
        }
        let result = body.read(n);
        self.last_progress = Some(now);
        if let Err(e) = result {
            self.fail(Outcome::Malformed(e), now);
        }
        self.form_heads();
        self.check_end(now);
    }

    /// Decodes what was read with the framing, as far as the ring has room.
    pub(super) fn pump(&mut self, now: Instant) {
        if let Some(Err(e)) = self.body.as_mut().map(Ingest::pump) {
            self.fail(Outcome::Malformed(e), now);
        }
        self.form_heads();
    }

    /// A form's first part's headers, once they are known: what the receivers' heads say.
    pub(super) fn form_pass_on(&self) -> Option<crate::request::PassOn> {
        let head = self.body.as_ref()?.form_head().ok()?;
        let sender = self.sender.and_then(|s| self.parties.get(s))?;
        let filename = head
            .and_then(|h| h.filename.as_deref())
            .filter(|f| !f.is_empty());
        let content_type = head.and_then(|h| h.content_type.clone()).or_else(|| {
            Some(if filename.is_some() || head.is_none() {
                "application/octet-stream".to_owned()
            } else {
                "text/plain; charset=utf-8".to_owned()
            })
        });
        Some(crate::request::PassOn {
            content_type,
            content_disposition: filename.map(|f| crate::filename::attachment(f, "download")),
            x_piping: sender.request.pass_on.x_piping.clone(),
        })
    }

    /// Room may have freed in the ring for sender bytes that were read with framing.
    pub(super) fn space_freed(&mut self, now: Instant) {
        if self.body.as_ref().is_some_and(Ingest::has_raw) {
            self.pump(now);
        }
    }

    pub(super) fn body_done(&self) -> bool {
        self.body.as_ref().is_some_and(Ingest::is_done)
    }
}
