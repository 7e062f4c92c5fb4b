//! Worker output on disk: each stream (stdout, stderr) is a directory of segment files named
//! by the byte offset at which they start. The per-worker shim appends and rotates; the daemon
//! reads any byte range that is still kept. Offsets are offsets in the whole stream, so rotation
//! never changes what an offset means: a client resumes exactly where it stopped.
//!
//! Cap: `segment_bytes × segments` per stream. When the newest segment reaches `segment_bytes`
//! a new one starts, and the oldest is deleted once more than `segments` exist.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Which output stream of a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StreamKind {
    Stdout,
    Stderr,
}

impl StreamKind {
    pub const BOTH: [StreamKind; 2] = [StreamKind::Stdout, StreamKind::Stderr];

    pub fn dir_name(self) -> &'static str {
        match self {
            StreamKind::Stdout => "stdout",
            StreamKind::Stderr => "stderr",
        }
    }
}

/// Rotation limits of one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotation {
    pub segment_bytes: u64,
    pub segments: u32,
}

fn segment_name(offset: u64) -> String {
    format!("{offset:020}.log")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    name.strip_suffix(".log")?.parse().ok()
}

/// Start offsets of the segments in `dir`, oldest first.
pub fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut v: Vec<u64> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(parse_segment_name))
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    v.sort_unstable();
    Ok(v)
}

/// Appends to one stream with rotation. Used by the shim only (single writer per stream). The
/// directory and first segment are created on the first write, so a silent worker costs no files
/// (a pooled worker's are made at once: [`SegmentWriter::start`]).
///
/// A write that fails (a full disk, an I/O error) drops what it could not write and never blocks
/// the worker: the current segment ends where its last byte landed and the next one starts after
/// the dropped bytes, so the stream's offsets jump over them and a reader sees the gap (a read
/// from inside it starts at the next kept byte, as after a rotation).
#[derive(Debug)]
pub struct SegmentWriter {
    dir: PathBuf,
    rotation: Rotation,
    file: Option<File>,
    /// Offset at which the current segment starts.
    base: u64,
    /// Bytes in the current segment.
    len: u64,
}

/// Output that could not be written: how much, and why.
#[derive(Debug, thiserror::Error)]
#[error("{bytes} bytes of output dropped: {source}")]
pub struct OutputDropped {
    pub bytes: u64,
    #[source]
    pub source: io::Error,
}

impl SegmentWriter {
    /// Prepares to append to the stream in `dir`, after whatever is already there.
    pub fn open(dir: &Path, rotation: Rotation) -> io::Result<Self> {
        let segs = list_segments(dir)?;
        let base = segs.last().copied().unwrap_or(0);
        let len = match fs::metadata(dir.join(segment_name(base))) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            rotation,
            file: None,
            base,
            len,
        })
    }

    /// Makes the directory and the current segment now rather than at the first write: for a
    /// worker that waits to be claimed (a pooled one), so that a follower holds its segment
    /// open (see [`Tail`]) before its first byte.
    pub fn start(&mut self) -> io::Result<()> {
        if self.file.is_none() {
            self.start_segment(self.base)?;
        }
        Ok(())
    }

    /// Offset of the next byte to be written.
    pub fn end(&self) -> u64 {
        self.base + self.len
    }

    /// Appends `data`, starting a new segment first when the current one is full. On a failure,
    /// what was not written is dropped and the offsets move past it (see the type's docs).
    pub fn write(&mut self, data: &[u8]) -> Result<(), OutputDropped> {
        let mut written = 0;
        let Err(source) = self.append(data, &mut written) else {
            return Ok(());
        };
        // A failed write may still have put some bytes in the file: those are kept, and the
        // segment's length on disk stays what its offsets say.
        if let Some(on_disk) = self.file.as_ref().and_then(|f| f.metadata().ok()) {
            let extra = on_disk.len().saturating_sub(self.len);
            let extra = extra.min((data.len() - written) as u64);
            self.len += extra;
            written += extra as usize;
        }
        let bytes = (data.len() - written) as u64;
        let next = self.end() + bytes;
        // A segment that holds nothing yet (the one after an earlier gap, on a disk still
        // full) moves past this gap too: a new empty segment for every failed write would push
        // kept ones out of the cap.
        if self.len == 0 && self.file.is_some() {
            let from = self.dir.join(segment_name(self.base));
            if fs::rename(from, self.dir.join(segment_name(next))).is_ok() {
                self.base = next;
                return Err(OutputDropped { bytes, source });
            }
        }
        // The next byte kept starts a segment of its own after the gap. Made now where it can
        // be (an empty file needs no data block), so readers see the gap at once; else with
        // the next write.
        self.file = None;
        self.base = next;
        self.len = 0;
        let _ = self.start_segment(next);
        Err(OutputDropped { bytes, source })
    }

    fn append(&mut self, mut data: &[u8], written: &mut usize) -> io::Result<()> {
        while !data.is_empty() {
            if self.file.is_none() {
                self.start_segment(self.base)?;
            }
            if self.len >= self.rotation.segment_bytes {
                self.start_segment(self.end())?;
            }
            let room = (self.rotation.segment_bytes - self.len) as usize;
            let n = room.min(data.len());
            let Some(file) = self.file.as_mut() else {
                return Err(io::Error::other("no segment open"));
            };
            let done = match file.write(&data[..n]) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(done) => done,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.len += done as u64;
            *written += done;
            data = &data[done..];
        }
        Ok(())
    }

    /// Opens (or makes) the segment that starts at `base` as the current one, and deletes the
    /// oldest segments past the cap.
    fn start_segment(&mut self, base: u64) -> io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(segment_name(base)))?;
        let len = file.metadata()?.len();
        self.file = Some(file);
        self.base = base;
        self.len = len;
        let segs = list_segments(&self.dir)?;
        let keep = self.rotation.segments.max(1) as usize;
        if segs.len() > keep {
            for old in &segs[..segs.len() - keep] {
                let _ = fs::remove_file(self.dir.join(segment_name(*old)));
            }
        }
        Ok(())
    }
}

/// The file in a worker's directory whose size is how many bytes of the worker's output (all
/// runs, both streams) were dropped: a sparse file, so that it can grow on a full disk.
pub const DROPPED_FILE: &str = "output.dropped";

/// Records that `total` bytes of the output of the worker in `dir` were dropped so far.
pub fn record_dropped(dir: &Path, total: u64) -> io::Result<()> {
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(dir.join(DROPPED_FILE))?;
    f.set_len(total)
}

/// How many bytes of the output of the worker in `dir` were dropped (0 when none was).
pub fn dropped_bytes(dir: &Path) -> u64 {
    fs::metadata(dir.join(DROPPED_FILE)).map_or(0, |m| m.len())
}

/// What a read of a stream found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadResult {
    /// Offset of the first byte of `data` (later than asked when older bytes were rotated away).
    pub offset: u64,
    pub data: Vec<u8>,
}

/// Offset one past the last byte written to the stream in `dir`.
pub fn stream_end(dir: &Path) -> io::Result<u64> {
    let segs = list_segments(dir)?;
    let Some(last) = segs.last() else {
        return Ok(0);
    };
    match fs::metadata(dir.join(segment_name(*last))) {
        Ok(m) => Ok(last + m.len()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(*last),
        Err(e) => Err(e),
    }
}

/// Reads up to `max` bytes of the stream in `dir` from `offset`. Bytes that were rotated away are
/// skipped: the result then starts at the oldest kept offset.
pub fn read_stream(dir: &Path, offset: u64, max: usize) -> io::Result<ReadResult> {
    read_stream_tail(dir, offset, max).map(|(r, _)| r)
}

/// [`read_stream`], which also gives the stream's last segment open when the read reached it,
/// for the next read to try [`Tail::read_cached`] first.
pub fn read_stream_tail(
    dir: &Path,
    offset: u64,
    max: usize,
) -> io::Result<(ReadResult, Option<Tail>)> {
    let segs = list_segments(dir)?;
    let mut tail = None;
    let mut out = Vec::new();
    let mut start = None;
    let mut pos = offset;
    for (i, base) in segs.iter().enumerate() {
        let next = segs.get(i + 1).copied();
        if next.is_some_and(|n| n <= pos) {
            continue;
        }
        let mut f = match File::open(dir.join(segment_name(*base))) {
            Ok(f) => f,
            // Rotated away between listing and opening.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let from = pos.max(*base);
        f.seek(SeekFrom::Start(from - base))?;
        let want = max - out.len();
        let mut buf = Vec::with_capacity(want.min(1 << 20));
        (&mut f).take(want as u64).read_to_end(&mut buf)?;
        if next.is_none() && nowait_reads(&f) {
            tail = Some(Tail {
                file: f,
                base: *base,
            });
        }
        if buf.is_empty() {
            if next.is_none() {
                break;
            }
            continue;
        }
        start.get_or_insert(from);
        pos = from + buf.len() as u64;
        out.extend_from_slice(&buf);
        if out.len() >= max {
            break;
        }
        // A segment shorter than its successor's base is complete; keep reading the next one.
        if next.is_some_and(|n| pos < n) {
            break;
        }
    }
    let read = ReadResult {
        offset: start.unwrap_or(offset.max(segs.first().copied().unwrap_or(0))),
        data: out,
    };
    Ok((read, tail))
}

/// Whether `f` is on a file system whose buffered reads take `RWF_NOWAIT` natively: ext4, XFS,
/// Btrfs (where state dirs are). Elsewhere (tmpfs, overlayfs, 9p, NFS) no segment is held, and
/// every read goes the blocking way: what kernels do with the flag there differs between
/// versions, and a CI run in the cgroup-v2 guest (kernel 6.1, overlayfs over tmpfs) once hung
/// with a reader and a writer of output spinning in the kernel (not shown to be this read; the
/// read is kept where it is known to work).
fn nowait_reads(f: &File) -> bool {
    use std::os::fd::AsFd;
    const EXT4: i64 = 0xEF53;
    const XFS: i64 = 0x5846_5342;
    const BTRFS: i64 = 0x9123_683E;
    matches!(crate::fd_fs_magic(f.as_fd()), Some(EXT4 | XFS | BTRFS))
}

/// The last segment of a stream, kept open by a reader between reads ([`read_stream_tail`]).
#[derive(Debug)]
pub struct Tail {
    file: File,
    /// The stream offset of the segment's first byte, which its file's name says while the
    /// file is that segment.
    base: u64,
}

impl Tail {
    /// Reads up to `max` bytes of the stream from `offset` out of this segment, from the page
    /// cache only: `fstat`, `preadv2` with `RWF_NOWAIT` and a `/proc/self/fd` link never wait
    /// for a disk, so an async thread may call it. `None` where that gives nothing: no new byte
    /// here (the stream may have moved on to a new segment), bytes not in the cache, an offset
    /// before this segment, or a file that is no longer this segment (rotated away, or moved on
    /// past a gap of dropped output): a blocking [`read_stream_tail`] then reads.
    pub fn read_cached(&self, offset: u64, max: usize) -> Option<ReadResult> {
        use std::os::fd::AsRawFd;
        let at = offset.checked_sub(self.base)?;
        let size = self.file.metadata().ok()?.len();
        let want = usize::try_from(size.checked_sub(at)?).ok()?.min(max);
        if want == 0 {
            return None;
        }
        let mut data = vec![0u8; want];
        let iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: want,
        };
        // SAFETY: the iovec points at `want` writable bytes of `data`, which outlives the call;
        // the fd is this Tail's open file.
        let n = unsafe {
            libc::preadv2(
                self.file.as_raw_fd(),
                &iov,
                1,
                libc::off_t::try_from(at).ok()?,
                libc::RWF_NOWAIT,
            )
        };
        let n = usize::try_from(n).ok().filter(|&n| n > 0)?;
        data.truncate(n);
        // After the read: a file renamed before the bytes were written into it (the only
        // renames are of empty segments) shows its new name here, one rotated away
        // "NAME (deleted)".
        let link = fs::read_link(format!("/proc/self/fd/{}", self.file.as_raw_fd())).ok()?;
        let name = segment_name(self.base);
        (link.file_name() == Some(std::ffi::OsStr::new(&name)))
            .then_some(ReadResult { offset, data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rot(seg: u64, n: u32) -> Rotation {
        Rotation {
            segment_bytes: seg,
            segments: n,
        }
    }

    #[test]
    fn a_held_tail_reads_new_bytes_until_its_segment_moves_on() {
        let d = tempfile::tempdir().unwrap();
        let mut w = SegmentWriter::open(d.path(), rot(8, 2)).unwrap();
        w.write(b"abc").unwrap();
        let (r, tail) = read_stream_tail(d.path(), 0, 100).unwrap();
        assert_eq!((r.offset, r.data.as_slice()), (0, &b"abc"[..]));
        let seg = File::open(d.path().join(segment_name(0))).unwrap();
        if !nowait_reads(&seg) {
            assert!(tail.is_none(), "no segment is held off ext4, XFS and Btrfs");
            eprintln!("skipped: the temporary dir is not on ext4, XFS or Btrfs");
            return;
        }
        let tail = tail.expect("the last segment is held");
        assert_eq!(tail.read_cached(3, 100), None, "nothing new yet");
        w.write(b"de").unwrap();
        let got = |t: &Tail, from, max| t.read_cached(from, max).map(|r| (r.offset, r.data));
        assert_eq!(got(&tail, 3, 100), Some((3, b"de".to_vec())));
        assert_eq!(got(&tail, 3, 1), Some((3, b"d".to_vec())));
        // The segment fills at 8 bytes; the rest goes to the next one, which the tail has not.
        w.write(b"fghij").unwrap();
        assert_eq!(got(&tail, 5, 100), Some((5, b"fgh".to_vec())));
        assert_eq!(got(&tail, 8, 100), None);
        let (r, next) = read_stream_tail(d.path(), 8, 100).unwrap();
        assert_eq!((r.offset, r.data.as_slice()), (8, &b"ij"[..]));
        assert_eq!(got(&next.unwrap(), 9, 100), Some((9, b"j".to_vec())));
        // Rotated away (two segments kept): its bytes are no more read through it.
        w.write(b"klmnopqr").unwrap();
        assert_eq!(list_segments(d.path()).unwrap(), vec![8, 16]);
        assert_eq!(got(&tail, 0, 100), None);
        // An empty segment renamed past a gap of dropped output, then written: its bytes are at
        // other offsets than the held name says, so they are left to a full read.
        let (_, held) = read_stream_tail(d.path(), 18, 100).unwrap();
        assert_eq!(got(held.as_ref().unwrap(), 18, 100), None);
        fs::rename(
            d.path().join(segment_name(16)),
            d.path().join(segment_name(40)),
        )
        .unwrap();
        let mut f = OpenOptions::new()
            .append(true)
            .open(d.path().join(segment_name(40)))
            .unwrap();
        f.write_all(b"stu").unwrap();
        assert_eq!(got(held.as_ref().unwrap(), 16, 100), None);
    }

    #[test]
    fn write_read_roundtrip_across_segments() {
        let d = tempfile::tempdir().unwrap();
        let mut w = SegmentWriter::open(d.path(), rot(4, 100)).unwrap();
        w.write(b"hello world, binary \x00\xff ok").unwrap();
        assert_eq!(w.end(), 25);
        assert_eq!(
            list_segments(d.path()).unwrap(),
            vec![0, 4, 8, 12, 16, 20, 24]
        );
        let r = read_stream(d.path(), 0, 1000).unwrap();
        assert_eq!(r.offset, 0);
        assert_eq!(r.data, b"hello world, binary \x00\xff ok");
        let r = read_stream(d.path(), 6, 5).unwrap();
        assert_eq!((r.offset, r.data.as_slice()), (6, &b"world"[..]));
        assert_eq!(stream_end(d.path()).unwrap(), 25);
        assert!(read_stream(d.path(), 25, 10).unwrap().data.is_empty());
    }

    #[test]
    fn rotation_drops_oldest_and_reads_skip_forward() {
        let d = tempfile::tempdir().unwrap();
        let mut w = SegmentWriter::open(d.path(), rot(10, 2)).unwrap();
        for i in 0..5u8 {
            w.write(&[b'a' + i; 10]).unwrap();
        }
        w.write(b"z").unwrap();
        assert_eq!(list_segments(d.path()).unwrap(), vec![40, 50]);
        let r = read_stream(d.path(), 0, 100).unwrap();
        assert_eq!(r.offset, 40);
        assert_eq!(r.data, b"eeeeeeeeeez");
    }

    #[test]
    fn reopen_continues_at_the_end() {
        let d = tempfile::tempdir().unwrap();
        let mut w = SegmentWriter::open(d.path(), rot(8, 3)).unwrap();
        w.write(b"0123456789").unwrap();
        drop(w);
        let mut w = SegmentWriter::open(d.path(), rot(8, 3)).unwrap();
        assert_eq!(w.end(), 10);
        w.write(b"ab").unwrap();
        assert_eq!(read_stream(d.path(), 0, 100).unwrap().data, b"0123456789ab");
    }

    #[test]
    fn a_failed_write_leaves_a_gap_in_the_offsets() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path()).unwrap();
        // A first segment that was written, then one that is /dev/full: every write to it
        // fails with ENOSPC.
        fs::write(d.path().join(segment_name(0)), "old\n").unwrap();
        std::os::unix::fs::symlink("/dev/full", d.path().join(segment_name(4))).unwrap();
        let mut w = SegmentWriter::open(d.path(), rot(100, 2)).unwrap();
        assert_eq!(w.end(), 4);
        let e = w.write(b"lost line\n").unwrap_err();
        assert_eq!(e.bytes, 10);
        assert_eq!(e.source.raw_os_error(), Some(libc::ENOSPC));
        // The offsets went on after the drop, and the next segment already marks the gap.
        assert_eq!(w.end(), 14);
        assert_eq!(list_segments(d.path()).unwrap(), vec![0, 14]);
        // More failed writes move that empty segment on; they never push the kept one out of
        // the cap of two segments.
        for _ in 0..5 {
            assert_eq!(w.write(b"0123456789").unwrap_err().bytes, 10);
        }
        assert_eq!(w.end(), 64);
        assert_eq!(list_segments(d.path()).unwrap(), vec![0, 64]);
        // As on a real full disk, the failed segment holds nothing (/dev/full reads zeros).
        fs::remove_file(d.path().join(segment_name(64))).unwrap();
        File::create(d.path().join(segment_name(64))).unwrap();
        let mut w = SegmentWriter::open(d.path(), rot(100, 2)).unwrap();
        assert_eq!(w.end(), 64);
        w.write(b"kept\n").unwrap();
        assert_eq!(w.end(), 69);
        assert_eq!(stream_end(d.path()).unwrap(), 69);
        let r = read_stream(d.path(), 0, 100).unwrap();
        assert_eq!((r.offset, r.data.as_slice()), (0, &b"old\n"[..]));
        // A reader at the gap, or inside it, skips to the next kept byte.
        for from in [4, 30] {
            let r = read_stream(d.path(), from, 100).unwrap();
            assert_eq!((r.offset, r.data.as_slice()), (64, &b"kept\n"[..]));
        }
        // A shim that starts again (a restart) goes on after the gap too.
        drop(w);
        let w = SegmentWriter::open(d.path(), rot(100, 2)).unwrap();
        assert_eq!(w.end(), 69);
    }

    #[test]
    fn dropped_bytes_are_the_size_of_a_sparse_file() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(dropped_bytes(d.path()), 0);
        record_dropped(d.path(), 1 << 40).unwrap();
        assert_eq!(dropped_bytes(d.path()), 1 << 40);
        record_dropped(d.path(), (1 << 40) + 5).unwrap();
        assert_eq!(dropped_bytes(d.path()), (1 << 40) + 5);
    }

    #[test]
    fn missing_stream_reads_empty() {
        let d = tempfile::tempdir().unwrap();
        let r = read_stream(&d.path().join("nope"), 0, 10).unwrap();
        assert!(r.data.is_empty());
        assert_eq!(stream_end(&d.path().join("nope")).unwrap(), 0);
    }
}
