"""How much of the state file's WAL SQLite will replay, read before SQLite opens it.

SQLite replays a WAL up to its last frame whose checksum chain holds and stops there without a
word: frames cut off the end or damaged in the middle take their commits (accepted readings,
counter moves) with them silently. Read here from the files themselves (sqlite.org/fileformat2.html,
"The Write-Ahead Log" and "WAL-Index Format"):

- the WAL header's salts and checksum, then every frame's chained checksum: the frames SQLite
  will keep end at the last commit frame of the unbroken chain;
- the -shm's wal-index header names mxFrame, the last frame a committed transaction reached. The
  WAL is fsynced before the index moves, so after a crash or power cut mxFrame can lag the WAL,
  never lead it: frames it names that the chain does not reach were committed and are lost;
- a WAL with a broken header, or frames of the current salts after the chain breaks, is damage
  even when the -shm is gone.

Nothing here raises on any bytes: a check that crashes would turn a bad disk into a restart loop."""
import struct

WAL_MAGIC = (0x377F0682, 0x377F0683)  # checksums little- / big-endian
WAL_HEADER = 32
FRAME_HEADER = 24
INDEX_HEADER = 48  # one copy of WalIndexHdr; the -shm starts with two


class WalReport:
    """What the WAL holds. damaged: why it cannot all be replayed, or None; kept_frames: frames
    SQLite will replay; lost_frames: committed or current-generation frames it will not."""

    def __init__(self, damaged=None, kept_frames=0, lost_frames=0):
        self.damaged, self.kept_frames, self.lost_frames = damaged, kept_frames, lost_frames


def _checksum(data, s0, s1, endian):
    words = struct.unpack("%s%dI" % (endian, len(data) // 4), data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def _index(shm):
    """(mxFrame, salts) of the -shm's wal-index header when its two copies agree, else None."""
    if len(shm) < 2 * INDEX_HEADER or shm[:INDEX_HEADER] != shm[INDEX_HEADER:2 * INDEX_HEADER]:
        return None
    for endian in "<>":  # the index is in the host's byte order
        version, _, _, is_init, _, _, max_frame = struct.unpack(endian + "3I2BHI", shm[:20])
        if version == 3007000 and is_init == 1:
            return max_frame, struct.unpack(">2I", shm[32:40])  # the WAL header's salts, copied as bytes
    return None


def check(db_path):
    """The WAL of db_path as SQLite will find it (no WAL: nothing to lose)."""
    try:
        with open(db_path + "-wal", "rb") as f:
            wal = f.read()
    except OSError:
        return WalReport()
    try:
        with open(db_path + "-shm", "rb") as f:
            shm = f.read(2 * INDEX_HEADER)
    except OSError:
        shm = b""
    return read(wal, shm)


def read(wal, shm=b""):
    """The report for a WAL's bytes and the start of its -shm (b"": none)."""
    index = _index(shm)
    header = _header(wal)
    if isinstance(header, str):
        # frames the index says were committed are gone with the header; a WAL being started
        # when the power went (no index of it, no frame after it) loses nothing committed
        if (index and index[0]) or len(wal) > WAL_HEADER + FRAME_HEADER + 512:
            return WalReport(header, 0, index[0] if index else 0)
        return WalReport()
    endian, page_size, salts, s = header
    frame = FRAME_HEADER + page_size
    kept = valid = 0
    offset = WAL_HEADER
    while offset + frame <= len(wal):
        pgno, commit, salt1, salt2, ck1, ck2 = struct.unpack(">6I", wal[offset:offset + FRAME_HEADER])
        if (salt1, salt2) != salts or pgno == 0:
            break
        s = _checksum(wal[offset:offset + 8], s[0], s[1], endian)
        s = _checksum(wal[offset + FRAME_HEADER:offset + frame], s[0], s[1], endian)
        if s != (ck1, ck2):
            break
        valid += 1
        kept = valid if commit else kept
        offset += frame
    lost = max(_committed_after(wal, offset, salts), index[0] - kept if index and index[1] == salts else 0)
    if lost:
        return WalReport("WAL cut short or damaged: %d committed frame(s) after frame %d will not be replayed"
                         % (lost, kept), kept, lost)
    return WalReport(None, kept, 0)


def _header(wal):
    """(endian, page size, salts, checksum) of the WAL header, or why it cannot be used."""
    if len(wal) < WAL_HEADER:
        return "WAL header cut short (%d bytes)" % len(wal)
    magic, version, page_size, _, salt1, salt2, ck1, ck2 = struct.unpack(">8I", wal[:WAL_HEADER])
    if magic not in WAL_MAGIC or version != 3007000 or not 512 <= page_size <= 65536 or page_size & (page_size - 1):
        return "WAL header unreadable"
    endian = ">" if magic & 1 else "<"
    if _checksum(wal[:24], 0, 0, endian) != (ck1, ck2):
        return "WAL header checksum fails"
    return endian, page_size, (salt1, salt2), (ck1, ck2)


def _committed_after(wal, offset, salts):
    """Frames of this WAL's generation after the chain broke, up to their last commit frame, when
    a commit frame among them is followed by another frame (else 0). A power cut tears at most the transaction being written,
    and SQLite writes the next one only after that one's commit frame is on disk: a commit frame
    followed by more frames was a finished commit. Frame headers are found by their salts at any
    offset, so a WAL with a piece cut out of its middle is read too; frames of an older generation
    (a WAL restarted in place) are normal leftovers."""
    needle = struct.pack(">2I", *salts)
    headers = []
    at = wal.find(needle, offset + 8)
    while at >= 0:
        headers.append(struct.unpack(">I", wal[at - 4:at])[0])  # the commit field before the salts
        at = wal.find(needle, at + 8)
    if not any(headers[:-1]):
        return 0
    return len(headers) if headers[-1] else max(i for i, commit in enumerate(headers) if commit) + 1
