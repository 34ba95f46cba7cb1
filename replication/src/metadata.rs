//! Persistence of one replica's metadata in a directory (the daemon passes
//! `<state_dir>/volumes/<name>/meta/`): generation identifiers and flags, per-peer bitmaps,
//! and the activity-log snapshot. Crash-safe by construction; every file says what a torn
//! write means.
//!
//! ```text
//! <dir>/superblock       2 slots x 8 KiB, written alternately (slot = seq % 2), in place:
//!                          "TNDMSB01" | seq u64 | len u32 | crc32c u32 | payload (len bytes)
//!                        payload: version, volume size, al-extents, flags (consistent,
//!                        was-up-to-date, primary, primary-lost-quorum, clean-shutdown),
//!                        current, history[], peers[] {name, bitmap gen, crashed, uncertain}
//!                        Torn write: that slot fails its crc, the other (previous) slot is
//!                        used. Both bad: MetaError::SuperblockCorrupt, never "fresh".
//! <dir>/al               2 slots (slot = seq % 2), each 24 + 8 x al-extents bytes, rounded
//!                        up to 4 KiB: "TNDMAL01" | seq u64 | count u32 | crc32c u32 | extents
//!                        Torn write: the other slot (an older snapshot: the write that
//!                        needed the new one was not issued yet) is used. A slot of zeroes
//!                        was never written. Both written and bad: MetaError::AlCorrupt.
//! <dir>/bitmap.<peer>    one record per 4 KiB bitmap page (128 MiB of volume):
//!                          page bytes (4096) | page index u64 | crc32c u32 | "BMPG"
//!                        Torn or missing record: that page loads as all out-of-sync
//!                        (costs resync time, never data) and is reported in
//!                        `Loaded::torn_bitmap_pages`.
//! ```
//!
//! Every write is `pwrite` + `fdatasync` (one fdatasync after all pages of a bitmap file
//! no superblock names yet); every `pwrite` goes through one helper, where the crash tests
//! cut the power. Files are created once (then the directory is fsynced) and afterwards
//! only overwritten in place, so no rename is needed.
//!
//! Attach ([`MetaStore::open`]): if the clean-shutdown flag is not set, the AL snapshot is
//! ORed into every peer bitmap (apply-al) and written out, and if the primary indicator is
//! set the replica owes every peer a post-crash resync (`UuidSet::crashed_primary`), or else
//! (a crashed Secondary with hot extents) it marks itself uncertain towards every peer, so it
//! is the target of the resync at equal generations (`UuidSet::uncertain_peers`); then the
//! superblock is written with clean-shutdown cleared ("in use"). All of this is idempotent,
//! so a crash during attach is repaired by the next attach. [`MetaStore::close_clean`]
//! flushes the bitmaps and sets the flag, so a clean restart does not apply the AL.
//!
//! Differences from DRBD: external metadata only (a directory, not the end of the backing
//! device); snapshots instead of an AL transaction ring; per-page checksums on the bitmap.

use crate::activity_log::{apply_al, AlError, MAX_AL_EXTENTS, MIN_AL_EXTENTS};
use crate::bitmap::{Bitmap, BitmapError, PAGE_BYTES};
use crate::generation::{Generation, UuidFlags, UuidSet, HISTORY_LEN};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const SB_MAGIC: &[u8; 8] = b"TNDMSB01";
const AL_MAGIC: &[u8; 8] = b"TNDMAL01";
const PAGE_MAGIC: &[u8; 4] = b"BMPG";
const SB_SLOT: u64 = 8192;
const HEADER: usize = 24;
const PAYLOAD_VERSION: u32 = 1;
const PAGE_RECORD: u64 = PAGE_BYTES as u64 + 16;
/// Longest peer name stored.
pub const MAX_PEER_NAME: usize = 64;
/// Most peers per replica (DRBD: 31 peers of 32 nodes).
pub const MAX_PEERS: usize = 31;

const FLAG_CONSISTENT: u32 = 1;
const FLAG_WAS_UP_TO_DATE: u32 = 2;
const FLAG_PRIMARY: u32 = 4;
const FLAG_PRIMARY_LOST_QUORUM: u32 = 8;
const FLAG_CLEAN_SHUTDOWN: u32 = 16;

/// Errors of the metadata store. Each names the file and the operation.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// A file operation failed.
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `create` found existing metadata.
    #[error("metadata already exists in {0}; refusing to overwrite it")]
    AlreadyExists(PathBuf),
    /// There is no metadata (never created).
    #[error("no metadata in {0} (superblock missing)")]
    NotFound(PathBuf),
    /// Neither superblock slot is valid.
    #[error("both superblock slots of {path} are corrupt ({slot0}; {slot1}); refusing to guess: restore the metadata or re-create the replica and let it full-sync")]
    SuperblockCorrupt {
        path: PathBuf,
        slot0: String,
        slot1: String,
    },
    /// Both activity-log slots were written and neither is valid.
    #[error("both activity-log slots of {path} are corrupt; the hot extents are unknown: a full sync of this replica is required")]
    AlCorrupt { path: PathBuf },
    /// A value does not fit the on-disk format.
    #[error("cannot store metadata: {0}")]
    Unstorable(String),
    /// A peer name is not usable as a file name component.
    #[error("peer name {0:?} is not valid (1-{MAX_PEER_NAME} characters of A-Z a-z 0-9 . _ -, not starting with '.')")]
    BadPeerName(String),
    /// Unknown peer.
    #[error("no bitmap for peer {0:?}")]
    UnknownPeer(String),
    /// A bitmap operation failed.
    #[error("bitmap of peer {peer}")]
    Bitmap {
        peer: String,
        #[source]
        source: BitmapError,
    },
    /// Applying the activity log failed.
    #[error("applying the activity log")]
    Al(#[source] AlError),
    /// Injected crash (tests only).
    #[error("injected crash")]
    InjectedCrash,
}

/// What the superblock holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaMeta {
    /// Volume size in bytes.
    pub volume_size: u64,
    /// Number of activity-log extents.
    pub al_extents: usize,
    /// Generation identifiers and flags (`new_generation_pending` is not stored).
    pub uuids: UuidSet,
    /// Set by a clean shutdown, cleared while in use.
    pub clean_shutdown: bool,
}

/// What [`MetaStore::open`] found.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The superblock (after crash recovery).
    pub meta: ReplicaMeta,
    /// Per-peer bitmaps (after apply-al when recovering).
    pub bitmaps: BTreeMap<String, Bitmap>,
    /// Sequence number of the AL snapshot loaded (seed `ActivityLog::from_snapshot`).
    pub al_seq: u64,
    /// The AL snapshot loaded.
    pub al_snapshot: Vec<u64>,
    /// Bitmap pages that were torn or missing and now read as all out of sync.
    pub torn_bitmap_pages: Vec<(String, usize)>,
    /// The previous run did not shut down cleanly: the AL was applied.
    pub recovered_from_crash: bool,
    /// The previous run crashed while Primary.
    pub crashed_primary: bool,
}

/// The metadata files of one replica.
#[derive(Debug)]
pub struct MetaStore {
    dir: PathBuf,
    superblock: File,
    sb_seq: u64,
    al: File,
    al_slot: u64,
    al_extents: usize,
    bitmaps: BTreeMap<String, File>,
    #[cfg(test)]
    crash: Option<CrashPoint>,
    /// fdatasync calls so far (tests).
    #[cfg(test)]
    syncs: u64,
}

#[cfg(test)]
#[derive(Debug, Clone, Copy)]
struct CrashPoint {
    writes_left: u64,
    tear_seed: u64,
}

#[cfg(test)]
impl CrashPoint {
    /// Count one write of `len` bytes; at the crash, how many of its bytes reach the disk.
    fn next_write(&mut self, len: usize) -> Option<usize> {
        if self.writes_left > 0 {
            self.writes_left -= 1;
            return None;
        }
        self.tear_seed = self
            .tear_seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        Some((self.tear_seed >> 33) as usize % (len + 1))
    }
}

#[cfg(test)]
thread_local! {
    /// The crash point the next [`MetaStore::create`] on this thread starts with (tests).
    static CREATE_CRASH: std::cell::Cell<Option<CrashPoint>> = const { std::cell::Cell::new(None) };
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> MetaError + 'a {
    move |source| MetaError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn check_peer_name(name: &str) -> Result<(), MetaError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_PEER_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(MetaError::BadPeerName(name.to_string()))
    }
}

fn al_slot_size(al_extents: usize) -> u64 {
    ((HEADER + 8 * al_extents) as u64).div_ceil(4096) * 4096
}

fn bitmap_path(dir: &Path, peer: &str) -> PathBuf {
    dir.join(format!("bitmap.{peer}"))
}

/// A checked little-endian reader over untrusted bytes.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).ok_or("length overflow")?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or_else(|| format!("truncated at byte {}", self.pos))?;
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
}

fn encode_payload(meta: &ReplicaMeta) -> Result<Vec<u8>, MetaError> {
    let u = &meta.uuids;
    let mut peers: BTreeSet<&String> = u.bitmap.keys().collect();
    peers.extend(u.crashed_primary.iter());
    peers.extend(u.uncertain_peers.iter());
    if peers.len() > MAX_PEERS {
        return Err(MetaError::Unstorable(format!(
            "{} peers, at most {MAX_PEERS}",
            peers.len()
        )));
    }
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(&PAYLOAD_VERSION.to_le_bytes());
    out.extend_from_slice(&meta.volume_size.to_le_bytes());
    out.extend_from_slice(&(meta.al_extents as u32).to_le_bytes());
    let mut flags = 0u32;
    for (on, bit) in [
        (u.flags.consistent, FLAG_CONSISTENT),
        (u.flags.was_up_to_date, FLAG_WAS_UP_TO_DATE),
        (u.flags.primary, FLAG_PRIMARY),
        (u.flags.primary_lost_quorum, FLAG_PRIMARY_LOST_QUORUM),
        (meta.clean_shutdown, FLAG_CLEAN_SHUTDOWN),
    ] {
        if on {
            flags |= bit;
        }
    }
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&u.current.raw().to_le_bytes());
    let history: Vec<&Generation> = u.history.iter().take(HISTORY_LEN).collect();
    out.extend_from_slice(&(history.len() as u32).to_le_bytes());
    for g in history {
        out.extend_from_slice(&g.raw().to_le_bytes());
    }
    out.extend_from_slice(&(peers.len() as u32).to_le_bytes());
    for p in peers {
        check_peer_name(p)?;
        out.push(p.len() as u8);
        out.extend_from_slice(p.as_bytes());
        out.extend_from_slice(&u.bitmap_for(p).raw().to_le_bytes());
        out.push(u8::from(u.crashed_primary.contains(p)));
        out.push(u8::from(u.uncertain_peers.contains(p)));
    }
    Ok(out)
}

fn decode_payload(buf: &[u8]) -> Result<ReplicaMeta, String> {
    let mut r = Reader { buf, pos: 0 };
    let version = r.u32()?;
    if version != PAYLOAD_VERSION {
        return Err(format!("unsupported payload version {version}"));
    }
    let volume_size = r.u64()?;
    let al_extents = r.u32()? as usize;
    if !(MIN_AL_EXTENTS..=MAX_AL_EXTENTS).contains(&al_extents) {
        return Err(format!("al-extents {al_extents} out of range"));
    }
    let flags = r.u32()?;
    let mut uuids = UuidSet {
        current: Generation::from_raw(r.u64()?),
        flags: UuidFlags {
            consistent: flags & FLAG_CONSISTENT != 0,
            was_up_to_date: flags & FLAG_WAS_UP_TO_DATE != 0,
            primary: flags & FLAG_PRIMARY != 0,
            primary_lost_quorum: flags & FLAG_PRIMARY_LOST_QUORUM != 0,
        },
        ..UuidSet::default()
    };
    let hist = r.u32()? as usize;
    if hist > HISTORY_LEN {
        return Err(format!("{hist} history entries, at most {HISTORY_LEN}"));
    }
    for _ in 0..hist {
        uuids.history.push(Generation::from_raw(r.u64()?));
    }
    let peers = r.u32()? as usize;
    if peers > MAX_PEERS {
        return Err(format!("{peers} peers, at most {MAX_PEERS}"));
    }
    for _ in 0..peers {
        let len = r.u8()? as usize;
        let name = std::str::from_utf8(r.take(len)?)
            .map_err(|_| "peer name is not UTF-8".to_string())?
            .to_string();
        check_peer_name(&name).map_err(|e| e.to_string())?;
        let g = Generation::from_raw(r.u64()?);
        if r.u8()? != 0 {
            uuids.crashed_primary.insert(name.clone());
        }
        if r.u8()? != 0 {
            uuids.uncertain_peers.insert(name.clone());
        }
        uuids.bitmap.insert(name, g);
    }
    Ok(ReplicaMeta {
        volume_size,
        al_extents,
        uuids,
        clean_shutdown: flags & FLAG_CLEAN_SHUTDOWN != 0,
    })
}

fn frame(magic: &[u8; 8], seq: u64, count_or_len: u32, body: &[u8]) -> Vec<u8> {
    let mut crc_input = Vec::with_capacity(12 + body.len());
    crc_input.extend_from_slice(&seq.to_le_bytes());
    crc_input.extend_from_slice(&count_or_len.to_le_bytes());
    crc_input.extend_from_slice(body);
    let crc = crc32c::crc32c(&crc_input);
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(magic);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&count_or_len.to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// Parse a framed slot: `Ok(None)` = all zeroes (never written), `Ok(Some((seq, n, body)))`
/// = valid, `Err` = corrupt (reason). `body_len` maps the header's count to a body length.
fn unframe(
    slot: &[u8],
    magic: &[u8; 8],
    body_len: impl Fn(u32) -> Option<usize>,
) -> Result<Option<(u64, u32, Vec<u8>)>, String> {
    if slot.iter().all(|b| *b == 0) {
        return Ok(None);
    }
    let mut r = Reader { buf: slot, pos: 0 };
    if r.take(8)? != magic {
        return Err("bad magic".to_string());
    }
    let seq = r.u64()?;
    let n = r.u32()?;
    let crc = r.u32()?;
    let len = body_len(n).ok_or_else(|| format!("bad length {n}"))?;
    let body = r.take(len)?;
    let mut crc_input = Vec::with_capacity(12 + len);
    crc_input.extend_from_slice(&seq.to_le_bytes());
    crc_input.extend_from_slice(&n.to_le_bytes());
    crc_input.extend_from_slice(body);
    if crc32c::crc32c(&crc_input) != crc {
        return Err(format!("checksum mismatch (seq {seq})"));
    }
    Ok(Some((seq, n, body.to_vec())))
}

fn read_slot(file: &File, path: &Path, offset: u64, len: u64) -> Result<Vec<u8>, MetaError> {
    let mut buf = vec![0u8; len as usize];
    let mut done = 0usize;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break, // short file: the rest reads as zeroes
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err("read", path)(e)),
        }
    }
    Ok(buf)
}

fn open_rw(path: &Path, create: bool) -> Result<File, MetaError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(create)
        .open(path)
        .map_err(io_err(if create { "create" } else { "open" }, path))
}

fn fsync_dir(dir: &Path) -> Result<(), MetaError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

/// One bitmap page as stored: its bytes, its index, a CRC of both and the page magic.
fn page_record(peer: &str, bitmap: &Bitmap, page: usize) -> Result<Vec<u8>, MetaError> {
    let mut rec = bitmap
        .page_bytes(page)
        .map_err(|source| MetaError::Bitmap {
            peer: peer.to_string(),
            source,
        })?;
    let idx = (page as u64).to_le_bytes();
    let crc = crc32c::crc32c_append(crc32c::crc32c(&idx), &rec);
    rec.extend_from_slice(&idx);
    rec.extend_from_slice(&crc.to_le_bytes());
    rec.extend_from_slice(PAGE_MAGIC);
    Ok(rec)
}

impl MetaStore {
    /// Create the metadata of a new replica in `dir` (created if missing) with an all-clean
    /// bitmap for each of `peers` (each also gets a bitmap slot in the stored `UuidSet`).
    /// Refuses to overwrite existing metadata.
    pub fn create(dir: &Path, meta: &ReplicaMeta, peers: &[&str]) -> Result<MetaStore, MetaError> {
        if !(MIN_AL_EXTENTS..=MAX_AL_EXTENTS).contains(&meta.al_extents) {
            return Err(MetaError::Unstorable(format!(
                "al-extents {} outside {MIN_AL_EXTENTS}..={MAX_AL_EXTENTS}",
                meta.al_extents
            )));
        }
        for p in peers {
            check_peer_name(p)?;
        }
        let mut meta = meta.clone();
        for p in peers {
            meta.uuids.bitmap.entry((*p).to_string()).or_default();
        }
        std::fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        let sb_path = dir.join("superblock");
        if sb_path.exists() {
            return Err(MetaError::AlreadyExists(dir.to_path_buf()));
        }
        let al_path = dir.join("al");
        let al = match open_rw(&al_path, true) {
            Ok(f) => f,
            Err(MetaError::Io { source, .. }) if source.kind() == io::ErrorKind::AlreadyExists => {
                // Left over from an interrupted create (the superblock is written last).
                open_rw(&al_path, false)?
            }
            Err(e) => return Err(e),
        };
        let al_slot = al_slot_size(meta.al_extents);
        al.set_len(2 * al_slot).map_err(io_err("size", &al_path))?;
        al.sync_all().map_err(io_err("fsync", &al_path))?;
        let mut bitmaps = BTreeMap::new();
        for p in peers {
            let path = bitmap_path(dir, p);
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .map_err(io_err("create", &path))?;
            bitmaps.insert((*p).to_string(), f);
        }
        // The superblock is created last: its existence means "metadata complete".
        let tmp = dir.join("superblock.tmp");
        let sb = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        let mut store = MetaStore {
            dir: dir.to_path_buf(),
            superblock: sb,
            sb_seq: 0,
            al,
            al_slot,
            al_extents: meta.al_extents,
            bitmaps,
            #[cfg(test)]
            crash: CREATE_CRASH.with(|c| c.take()),
            #[cfg(test)]
            syncs: 0,
        };
        for p in peers {
            store.write_new_bitmap(p, &Bitmap::new(meta.volume_size))?;
        }
        store.write_superblock(&meta)?;
        std::fs::rename(&tmp, &sb_path).map_err(io_err("rename", &tmp))?;
        fsync_dir(dir)?;
        Ok(store)
    }

    /// Open existing metadata, recovering from a crash if the last run did not shut down
    /// cleanly (see module doc), and mark it in use.
    pub fn open(dir: &Path) -> Result<(MetaStore, Loaded), MetaError> {
        let sb_path = dir.join("superblock");
        let superblock = match OpenOptions::new().read(true).write(true).open(&sb_path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(MetaError::NotFound(dir.to_path_buf()))
            }
            Err(e) => return Err(io_err("open", &sb_path)(e)),
        };
        let mut best: Option<(u64, ReplicaMeta)> = None;
        let mut reasons = Vec::new();
        for slot in 0..2u64 {
            let buf = read_slot(&superblock, &sb_path, slot * SB_SLOT, SB_SLOT)?;
            let parsed = unframe(&buf, SB_MAGIC, |n| {
                let n = n as usize;
                (n <= SB_SLOT as usize - HEADER).then_some(n)
            })
            .and_then(|o| o.ok_or_else(|| "never written".to_string()))
            .and_then(|(seq, _, body)| decode_payload(&body).map(|m| (seq, m)));
            match parsed {
                Ok((seq, m)) => {
                    if best.as_ref().is_none_or(|(s, _)| seq > *s) {
                        best = Some((seq, m));
                    }
                    reasons.push("ok".to_string());
                }
                Err(e) => reasons.push(e),
            }
        }
        let Some((sb_seq, mut meta)) = best else {
            return Err(MetaError::SuperblockCorrupt {
                path: sb_path,
                slot0: reasons[0].clone(),
                slot1: reasons[1].clone(),
            });
        };
        if let Some(bad) = reasons.iter().find(|r| *r != "ok" && *r != "never written") {
            tracing::warn!(path = %sb_path.display(), reason = %bad, seq = sb_seq,
                "one superblock slot is unreadable (torn write); using the other");
        }

        let al_path = dir.join("al");
        let al = open_rw(&al_path, false)?;
        let al_slot = al_slot_size(meta.al_extents);
        let mut al_best: Option<(u64, Vec<u64>)> = None;
        let mut al_bad = 0;
        for slot in 0..2u64 {
            let buf = read_slot(&al, &al_path, slot * al_slot, al_slot)?;
            let cap = meta.al_extents;
            match unframe(&buf, AL_MAGIC, |n| {
                let n = n as usize;
                (n <= cap).then_some(n * 8)
            }) {
                Ok(Some((seq, _, body))) => {
                    let ext: Vec<u64> = body
                        .chunks_exact(8)
                        .map(|c| {
                            let mut a = [0u8; 8];
                            a.copy_from_slice(c);
                            u64::from_le_bytes(a)
                        })
                        .collect();
                    if al_best.as_ref().is_none_or(|(s, _)| seq > *s) {
                        al_best = Some((seq, ext));
                    }
                }
                Ok(None) => {}
                Err(_) => al_bad += 1,
            }
        }
        let (al_seq, al_snapshot) = match al_best {
            Some(b) => b,
            // Only the very first transaction was ever attempted, and it was torn: the write
            // that needed it was never issued.
            None if al_bad < 2 => (0, Vec::new()),
            None => return Err(MetaError::AlCorrupt { path: al_path }),
        };

        let peers: Vec<String> = meta.uuids.bitmap.keys().cloned().collect();
        let mut files = BTreeMap::new();
        let mut bitmaps = BTreeMap::new();
        let mut torn = Vec::new();
        for p in &peers {
            let path = bitmap_path(dir, p);
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(io_err("open", &path))?;
            let mut bm = Bitmap::new(meta.volume_size);
            for page in 0..bm.pages() {
                let rec = read_slot(&f, &path, page as u64 * PAGE_RECORD, PAGE_RECORD)?;
                let ok = Self::check_page_record(&rec, page);
                if !ok {
                    torn.push((p.clone(), page));
                }
                bm.load_page(page, ok.then(|| &rec[..PAGE_BYTES]))
                    .map_err(|source| MetaError::Bitmap {
                        peer: p.clone(),
                        source,
                    })?;
            }
            files.insert(p.clone(), f);
            bitmaps.insert(p.clone(), bm);
        }

        let mut store = MetaStore {
            dir: dir.to_path_buf(),
            superblock,
            sb_seq,
            al,
            al_slot,
            al_extents: meta.al_extents,
            bitmaps: files,
            #[cfg(test)]
            crash: None,
            #[cfg(test)]
            syncs: 0,
        };
        // Torn pages now read as dirty: write them back so the checksum is valid again.
        for (p, page) in &torn {
            if let Some(bm) = bitmaps.get(p) {
                store.write_bitmap_pages(p, bm, &[*page])?;
            }
        }

        let recovered_from_crash = !meta.clean_shutdown;
        let crashed_primary = recovered_from_crash && meta.uuids.flags.primary;
        if recovered_from_crash {
            apply_al(&al_snapshot, bitmaps.values_mut()).map_err(MetaError::Al)?;
            for (p, bm) in bitmaps.iter_mut() {
                let pages = bm.take_changed_pages();
                store.write_bitmap_pages(p, bm, &pages)?;
            }
            let names: Vec<&str> = peers.iter().map(String::as_str).collect();
            if crashed_primary {
                meta.uuids.mark_crashed_primary(&names);
                meta.uuids.flags.primary = false;
            } else if !al_snapshot.is_empty() {
                // A Secondary died with peer writes in flight: its hot extents may hold
                // half-applied data at the Primary's generation. It is the target of the
                // next resync with a peer at that generation, unless a rule that ranks
                // first decides otherwise (a crashed Primary under protocol C, or both
                // sides uncertain): each block then holds the old or the new version, and
                // the hot extents are in the resynced union, so the pair still converges.
                meta.uuids.mark_uncertain(&names);
            }
        }
        for bm in bitmaps.values_mut() {
            bm.take_changed_pages();
        }
        meta.clean_shutdown = false;
        store.write_superblock(&meta)?;
        Ok((
            store,
            Loaded {
                meta,
                bitmaps,
                al_seq,
                al_snapshot,
                torn_bitmap_pages: torn,
                recovered_from_crash,
                crashed_primary,
            },
        ))
    }

    fn check_page_record(rec: &[u8], page: usize) -> bool {
        if rec.len() < PAGE_RECORD as usize {
            return false;
        }
        let (data, trailer) = rec.split_at(PAGE_BYTES);
        let mut idx = [0u8; 8];
        idx.copy_from_slice(&trailer[0..8]);
        let mut crc = [0u8; 4];
        crc.copy_from_slice(&trailer[8..12]);
        if &trailer[12..16] != PAGE_MAGIC || u64::from_le_bytes(idx) != page as u64 {
            return false;
        }
        let mut c = crc32c::crc32c(&trailer[0..8]);
        c = crc32c::crc32c_append(c, data);
        c == u32::from_le_bytes(crc)
    }

    /// The directory this store lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The open file `which` and its path.
    fn file(&self, which: FileId<'_>) -> Result<(&File, PathBuf), MetaError> {
        Ok(match which {
            FileId::Superblock => (&self.superblock, self.dir.join("superblock")),
            FileId::Al => (&self.al, self.dir.join("al")),
            FileId::Bitmap(p) => (
                self.bitmaps
                    .get(p)
                    .ok_or_else(|| MetaError::UnknownPeer(p.to_string()))?,
                bitmap_path(&self.dir, p),
            ),
        })
    }

    /// Write `buf` at `offset` of `which`, not yet durable: every metadata write goes
    /// through here, so the crash tests can cut the power at any of them (a prefix of the
    /// write reaches the file, nothing after it does).
    fn write_at(&mut self, which: FileId<'_>, buf: &[u8], offset: u64) -> Result<(), MetaError> {
        #[cfg(test)]
        let torn = self.crash.as_mut().and_then(|cp| cp.next_write(buf.len()));
        let (file, path) = self.file(which)?;
        #[cfg(test)]
        if let Some(keep) = torn {
            let _ = file.write_all_at(&buf[..keep], offset);
            return Err(MetaError::InjectedCrash);
        }
        file.write_all_at(buf, offset)
            .map_err(io_err("write", &path))
    }

    /// Make the writes to `which` so far durable (one fdatasync).
    fn sync(&mut self, which: FileId<'_>) -> Result<(), MetaError> {
        #[cfg(test)]
        {
            self.syncs += 1;
        }
        let (file, path) = self.file(which)?;
        file.sync_data().map_err(io_err("fdatasync", &path))
    }

    /// One durable write: [`Self::write_at`], then [`Self::sync`].
    fn write_durable(
        &mut self,
        which: FileId<'_>,
        buf: &[u8],
        offset: u64,
    ) -> Result<(), MetaError> {
        self.write_at(which, buf, offset)?;
        self.sync(which)
    }

    /// Write the superblock durably into the older slot.
    pub fn write_superblock(&mut self, meta: &ReplicaMeta) -> Result<(), MetaError> {
        let payload = encode_payload(meta)?;
        if payload.len() + HEADER > SB_SLOT as usize {
            return Err(MetaError::Unstorable(format!(
                "superblock payload of {} bytes exceeds the slot",
                payload.len()
            )));
        }
        let seq = self.sb_seq + 1;
        let mut buf = frame(SB_MAGIC, seq, payload.len() as u32, &payload);
        buf.resize(SB_SLOT as usize, 0);
        self.write_durable(FileId::Superblock, &buf, (seq % 2) * SB_SLOT)?;
        self.sb_seq = seq;
        Ok(())
    }

    /// Persist an activity-log snapshot (`AlTransaction::snapshot`) as transaction `seq`.
    /// Transactions must be written one at a time in increasing `seq`.
    pub fn write_al(&mut self, seq: u64, snapshot: &[u64]) -> Result<(), MetaError> {
        if snapshot.len() > self.al_extents {
            return Err(MetaError::Unstorable(format!(
                "AL snapshot of {} extents exceeds al-extents {}",
                snapshot.len(),
                self.al_extents
            )));
        }
        let body: Vec<u8> = snapshot.iter().flat_map(|e| e.to_le_bytes()).collect();
        let mut buf = frame(AL_MAGIC, seq, snapshot.len() as u32, &body);
        buf.resize(self.al_slot as usize, 0);
        self.write_durable(FileId::Al, &buf, (seq % 2) * self.al_slot)
    }

    /// Write the given pages of `peer`'s bitmap durably.
    pub fn write_bitmap_pages(
        &mut self,
        peer: &str,
        bitmap: &Bitmap,
        pages: &[usize],
    ) -> Result<(), MetaError> {
        for &page in pages {
            let rec = page_record(peer, bitmap, page)?;
            self.write_durable(FileId::Bitmap(peer), &rec, page as u64 * PAGE_RECORD)?;
        }
        Ok(())
    }

    /// Write every page of a bitmap file that no superblock names yet (a new replica's, a
    /// new peer's), then make them durable with one fdatasync instead of one per page:
    /// nothing reads the file before a superblock naming the peer is written, after this.
    fn write_new_bitmap(&mut self, peer: &str, bitmap: &Bitmap) -> Result<(), MetaError> {
        for page in 0..bitmap.pages() {
            let rec = page_record(peer, bitmap, page)?;
            self.write_at(FileId::Bitmap(peer), &rec, page as u64 * PAGE_RECORD)?;
        }
        self.sync(FileId::Bitmap(peer))
    }

    /// Write every changed page of `peer`'s bitmap and forget the changes.
    pub fn flush_bitmap(&mut self, peer: &str, bitmap: &mut Bitmap) -> Result<(), MetaError> {
        let pages = bitmap.changed_pages();
        self.write_bitmap_pages(peer, bitmap, &pages)?;
        bitmap.mark_pages_written(&pages);
        Ok(())
    }

    /// Write the changed pages covering `[offset, offset+len)` of `peer`'s bitmap (what AL
    /// eviction requires before the transaction is persisted).
    pub fn flush_bitmap_range(
        &mut self,
        peer: &str,
        bitmap: &mut Bitmap,
        offset: u64,
        len: u64,
    ) -> Result<(), MetaError> {
        if len == 0 || offset >= bitmap.volume_size() {
            return Ok(());
        }
        let last = offset.saturating_add(len).min(bitmap.volume_size()) - 1;
        let (first, last) = (Bitmap::page_of(offset), Bitmap::page_of(last));
        let pages: Vec<usize> = bitmap
            .changed_pages()
            .into_iter()
            .filter(|p| (first..=last).contains(p))
            .collect();
        self.write_bitmap_pages(peer, bitmap, &pages)?;
        bitmap.mark_pages_written(&pages);
        Ok(())
    }

    /// Add a bitmap file for a new peer (written from `bitmap`, e.g. all dirty for a peer
    /// that still needs a full sync). Persist the superblock naming the peer afterwards.
    pub fn add_peer(&mut self, peer: &str, bitmap: &mut Bitmap) -> Result<(), MetaError> {
        check_peer_name(peer)?;
        let path = bitmap_path(&self.dir, peer);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io_err("create", &path))?;
        self.bitmaps.insert(peer.to_string(), f);
        self.write_new_bitmap(peer, bitmap)?;
        bitmap.take_changed_pages();
        fsync_dir(&self.dir)
    }

    /// Forget a removed peer: close and delete its bitmap file. Persist the superblock
    /// without the peer first; a crash in between leaves a stray file that a later
    /// [`MetaStore::add_peer`] of that name truncates.
    pub fn remove_peer(&mut self, peer: &str) -> Result<(), MetaError> {
        check_peer_name(peer)?;
        self.bitmaps.remove(peer);
        let path = bitmap_path(&self.dir, peer);
        match std::fs::remove_file(&path) {
            Ok(()) => fsync_dir(&self.dir),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &path)(e)),
        }
    }

    /// Grow the volume: extend every bitmap (the new area out of sync when
    /// `new_area_dirty`, e.g. when peers have not grown yet), write the new pages, then the
    /// superblock with the new size. A crash in between leaves the old size in the
    /// superblock, and the extra pages are ignored. The activity-log size (`al_extents`) is
    /// fixed at creation.
    pub fn grow(
        &mut self,
        meta: &mut ReplicaMeta,
        bitmaps: &mut BTreeMap<String, Bitmap>,
        new_size: u64,
        new_area_dirty: bool,
    ) -> Result<(), MetaError> {
        for (p, bm) in bitmaps.iter_mut() {
            bm.resize(new_size, new_area_dirty)
                .map_err(|source| MetaError::Bitmap {
                    peer: p.clone(),
                    source,
                })?;
            self.flush_bitmap(p, bm)?;
        }
        meta.volume_size = new_size;
        self.write_superblock(meta)
    }

    /// Clean shutdown: flush every bitmap, then set the clean-shutdown flag, so the next
    /// `open` does not apply the activity log. `meta.uuids.flags.primary` should already be
    /// false (demoted).
    pub fn close_clean(
        mut self,
        meta: &ReplicaMeta,
        bitmaps: &mut BTreeMap<String, Bitmap>,
    ) -> Result<(), MetaError> {
        for (p, bm) in bitmaps.iter_mut() {
            self.flush_bitmap(p, bm)?;
        }
        let mut m = meta.clone();
        m.clean_shutdown = true;
        self.write_superblock(&m)
    }

    /// Make the next [`MetaStore::create`] on this thread crash after `writes` writes.
    #[cfg(test)]
    fn crash_next_create(writes: u64, tear_seed: u64) {
        CREATE_CRASH.with(|c| {
            c.set(Some(CrashPoint {
                writes_left: writes,
                tear_seed,
            }))
        });
    }

    #[cfg(test)]
    fn crash_after(&mut self, writes: u64, tear_seed: u64) {
        self.crash = Some(CrashPoint {
            writes_left: writes,
            tear_seed,
        });
    }
}

#[derive(Clone, Copy)]
enum FileId<'a> {
    Superblock,
    Al,
    Bitmap(&'a str),
}

#[cfg(test)]
mod tests;
