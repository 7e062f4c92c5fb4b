//! Workers' output on the terminal. One worker's bytes pass through untouched (binary-safe,
//! byte-exact); the output of several is cut into lines, each prefixed by `[id] `, so lines of
//! different workers never interleave mid-line.

use std::borrow::Cow;
use std::collections::BTreeMap;

use crate::pb;

/// A partial line longer than this is written out (and ended) rather than held back for ever.
const MAX_PENDING: usize = 64 << 10;

/// Where a chunk of output goes: the CLI's standard output or standard error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Sink {
    Stdout,
    Stderr,
}

impl Sink {
    /// Workers' stdout to ours, stderr to ours; an unknown stream counts as stdout.
    pub fn of(stream: pb::Stream) -> Self {
        match stream {
            pb::Stream::Stderr => Sink::Stderr,
            pb::Stream::Stdout | pb::Stream::Unspecified => Sink::Stdout,
        }
    }
}

/// Turns output chunks into the bytes to write.
#[derive(Debug, Default)]
pub struct OutputDemux {
    prefix: bool,
    /// The unfinished last line of each (worker, sink), held until its newline comes.
    pending: BTreeMap<(String, Sink), Vec<u8>>,
}

impl OutputDemux {
    /// `prefix`: several workers are selected, so every line carries its worker's id.
    pub fn new(prefix: bool) -> Self {
        Self {
            prefix,
            pending: BTreeMap::new(),
        }
    }

    /// The bytes to write for `chunk`, and where.
    pub fn push<'a>(&mut self, chunk: &'a pb::OutputChunk) -> (Sink, Cow<'a, [u8]>) {
        let sink = Sink::of(chunk.stream());
        if !self.prefix {
            return (sink, Cow::Borrowed(&chunk.data));
        }
        let key = (chunk.worker_id.clone(), sink);
        let pending = self.pending.entry(key).or_default();
        pending.extend_from_slice(&chunk.data);
        let complete = match pending.iter().rposition(|b| *b == b'\n') {
            Some(i) => i + 1,
            None if pending.len() > MAX_PENDING => pending.len(),
            None => return (sink, Cow::Owned(Vec::new())),
        };
        let rest = pending.split_off(complete);
        let lines = std::mem::replace(pending, rest);
        (sink, Cow::Owned(prefix_lines(&chunk.worker_id, &lines)))
    }

    /// What is still held back of worker `id` (its unfinished last lines, once it has ended),
    /// each ended by a newline.
    pub fn finish_worker(&mut self, id: &str) -> Vec<(Sink, Vec<u8>)> {
        let mut out = Vec::new();
        for sink in [Sink::Stdout, Sink::Stderr] {
            if let Some(bytes) = self.pending.remove(&(id.to_owned(), sink)) {
                if !bytes.is_empty() {
                    out.push((sink, prefix_lines(id, &bytes)));
                }
            }
        }
        out
    }

    /// What is still held back (unfinished last lines), each ended by a newline; empties it.
    pub fn finish(&mut self) -> Vec<(Sink, Vec<u8>)> {
        std::mem::take(&mut self.pending)
            .into_iter()
            .filter(|(_, bytes)| !bytes.is_empty())
            .map(|((id, sink), bytes)| (sink, prefix_lines(&id, &bytes)))
            .collect()
    }
}

/// `[id] ` before every line of `bytes`; a last line without newline gets one.
fn prefix_lines(id: &str, bytes: &[u8]) -> Vec<u8> {
    let tag = format!("[{id}] ");
    let mut out = Vec::with_capacity(bytes.len() + tag.len() * 2);
    for line in bytes.split_inclusive(|b| *b == b'\n') {
        out.extend_from_slice(tag.as_bytes());
        out.extend_from_slice(line);
        if !line.ends_with(b"\n") {
            out.push(b'\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(id: &str, stream: pb::Stream, data: &[u8]) -> pb::OutputChunk {
        pb::OutputChunk {
            worker_id: id.into(),
            stream: stream as i32,
            data: data.to_vec(),
            offset: 0,
        }
    }

    #[test]
    fn one_worker_passes_bytes_through() {
        let mut d = OutputDemux::new(false);
        let data = b"\x00\xff partial line without newline";
        let c = chunk("a", pb::Stream::Stdout, data);
        let (sink, out) = d.push(&c);
        assert_eq!(sink, Sink::Stdout);
        assert_eq!(&*out, data);
        assert!(matches!(out, Cow::Borrowed(_)));
        let c = chunk("a", pb::Stream::Stderr, b"err");
        assert_eq!(d.push(&c), (Sink::Stderr, Cow::Borrowed(&b"err"[..])));
        assert!(d.finish().is_empty());
    }

    #[test]
    fn several_workers_get_prefixed_lines() {
        let mut d = OutputDemux::new(true);
        let mut out = Vec::new();
        for c in [
            chunk("a", pb::Stream::Stdout, b"hel"),
            chunk("b", pb::Stream::Stdout, b"one\ntwo\nthr"),
            chunk("a", pb::Stream::Stdout, b"lo\n"),
            chunk("a", pb::Stream::Stderr, b"oops\n"),
            chunk("b", pb::Stream::Stdout, b"ee"),
        ] {
            let (sink, bytes) = d.push(&c);
            out.push((sink, String::from_utf8(bytes.into_owned()).unwrap()));
        }
        assert_eq!(
            out,
            [
                (Sink::Stdout, String::new()),
                (Sink::Stdout, "[b] one\n[b] two\n".into()),
                (Sink::Stdout, "[a] hello\n".into()),
                (Sink::Stderr, "[a] oops\n".into()),
                (Sink::Stdout, String::new()),
            ]
        );
        assert_eq!(d.finish(), [(Sink::Stdout, b"[b] three\n".to_vec())]);
        assert!(d.finish().is_empty());
    }

    #[test]
    fn one_worker_finishes_alone() {
        let mut d = OutputDemux::new(true);
        for c in [
            chunk("a", pb::Stream::Stdout, b"a1"),
            chunk("a", pb::Stream::Stderr, b"a2"),
            chunk("b", pb::Stream::Stdout, b"b1"),
        ] {
            d.push(&c);
        }
        assert_eq!(
            d.finish_worker("a"),
            [
                (Sink::Stdout, b"[a] a1\n".to_vec()),
                (Sink::Stderr, b"[a] a2\n".to_vec())
            ]
        );
        assert!(d.finish_worker("a").is_empty());
        assert_eq!(d.finish(), [(Sink::Stdout, b"[b] b1\n".to_vec())]);
    }

    #[test]
    fn endless_line_is_written_out() {
        let mut d = OutputDemux::new(true);
        let big = vec![b'x'; MAX_PENDING + 1];
        let c = chunk("a", pb::Stream::Stdout, &big);
        let (_, out) = d.push(&c);
        assert_eq!(out.len(), big.len() + "[a] \n".len());
        assert!(d.finish().is_empty());
    }

    #[test]
    fn prefixes_every_line() {
        assert_eq!(prefix_lines("w", b"a\n\nb"), b"[w] a\n[w] \n[w] b\n");
        assert_eq!(prefix_lines("w", b""), b"");
    }
}
