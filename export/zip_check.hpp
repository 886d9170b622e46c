// Integrity of the zip archives the runner loads (TorchScript .pt, AOTInductor .pt2), checked before torch reads
// them: torch does not verify the CRC-32 of a record, so a file with damaged bytes loads and runs (writing an
// all-black image), and a package whose shared library was cut short and re-zipped crashes the process when the
// library is mapped. The C++ twin of tur_ext/integrity.py (verify_zip, _check_manifest).
//
// verify_archive() reads the End Of Central Directory record (and the ZIP64 one that torch always writes), walks the
// central directory, and for each entry checks its local header and streams its data (1 MiB at a time, never the
// whole file) through CRC-32, comparing the size and the checksum with the central directory. Stored entries (what
// torch writes) are checksummed as they are; deflated ones (an archive re-zipped by another tool, which torch still
// loads) are inflated on the fly by a small decoder here. check_manifest() compares the archive with the manifest
// the exporter adds to a .pt2 (<root>/tur_manifest.json: size and CRC-32 of every other entry).
//
// Errors are ZipError with the text that follows the file's name in the runner's message ("is corrupt (...)");
// NotAZip means the file is not a zip archive at all (the runner says "not a model").
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "json_min.hpp"

namespace tur::zip {

// The message tail after "--model 'PATH'", e.g. " is corrupt (entry 'x' fails its CRC-32 check); ...".
struct ZipError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// Not a zip archive: no end of central directory record and no local file header at the start.
struct NotAZip : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline constexpr const char* kManifestName = "tur_manifest.json";
inline constexpr const char* kManifestFormat = "tur_ext.manifest";
inline constexpr const char* kCopyAgain = "; re-export or copy it again";

// An entry's name for a message: in quotes, control and non-ASCII bytes as \xNN (a damaged name must not break the
// one-line message, nor its text encoding).
inline std::string quote_name(std::string_view s) {
  std::string out = "'";
  for (unsigned char c : s) {
    if (c >= 0x20 && c < 0x7F) {
      out += static_cast<char>(c);
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    }
  }
  return out + "'";
}

// --- CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320), eight bytes per step ---------------------------------

class Crc32 {
 public:
  void update(const uint8_t* p, size_t n) {
    const auto& t = tables();
    uint32_t c = ~crc_;
    while (n >= 8) {
      const uint32_t a = c ^ (uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24);
      const uint32_t b = uint32_t(p[4]) | uint32_t(p[5]) << 8 | uint32_t(p[6]) << 16 | uint32_t(p[7]) << 24;
      c = t[7][a & 0xFF] ^ t[6][(a >> 8) & 0xFF] ^ t[5][(a >> 16) & 0xFF] ^ t[4][a >> 24] ^ t[3][b & 0xFF] ^
          t[2][(b >> 8) & 0xFF] ^ t[1][(b >> 16) & 0xFF] ^ t[0][b >> 24];
      p += 8;
      n -= 8;
    }
    while (n--) c = t[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
    crc_ = ~c;
  }
  uint32_t value() const { return crc_; }

 private:
  using Tables = std::array<std::array<uint32_t, 256>, 8>;
  // t[0] is the byte-at-a-time table; t[k][i] is the CRC of byte i followed by k zero bytes.
  static const Tables& tables() {
    static const Tables t = [] {
      Tables r{};
      for (uint32_t i = 0; i < 256; ++i) {
        uint32_t c = i;
        for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0xEDB88320u : c >> 1;
        r[0][i] = c;
      }
      for (uint32_t i = 0; i < 256; ++i)
        for (size_t k = 1; k < 8; ++k) r[k][i] = (r[k - 1][i] >> 8) ^ r[0][r[k - 1][i] & 0xFF];
      return r;
    }();
    return t;
  }
  uint32_t crc_ = 0;
};

inline uint32_t crc32(const void* data, size_t n) {
  Crc32 c;
  c.update(static_cast<const uint8_t*>(data), n);
  return c.value();
}

// --- the file --------------------------------------------------------------------------------------------------

class File {
 public:
  explicit File(const std::string& path) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) throw ZipError(std::string(": cannot open: ") + std::strerror(errno));
    struct stat st {};
    if (::fstat(fd_, &st) != 0) throw ZipError(std::string(": cannot read: ") + std::strerror(errno));
    size_ = static_cast<uint64_t>(st.st_size);
  }
  ~File() {
    if (fd_ >= 0) ::close(fd_);
  }
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  uint64_t size() const { return size_; }

  // Reads exactly n bytes at offset, or fewer where the file ends; throws on an I/O error.
  size_t read_at(uint64_t offset, void* buf, size_t n) const {
    size_t got = 0;
    while (got < n) {
      ssize_t r = ::pread(fd_, static_cast<char*>(buf) + got, n - got, static_cast<off_t>(offset + got));
      if (r < 0) {
        if (errno == EINTR) continue;
        throw ZipError(std::string(": cannot read: ") + std::strerror(errno));
      }
      if (r == 0) break;
      got += static_cast<size_t>(r);
    }
    return got;
  }

 private:
  int fd_ = -1;
  uint64_t size_ = 0;
};

inline uint16_t le16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | p[1] << 8); }
inline uint32_t le32(const uint8_t* p) {
  return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
}
inline uint64_t le64(const uint8_t* p) { return uint64_t(le32(p)) | uint64_t(le32(p + 4)) << 32; }

// Bytes [begin, end) of the file, delivered in chunks of up to 1 MiB.
class RangeReader {
 public:
  // `buffer`: reused from one range to the next (an archive may have tens of thousands of small entries).
  RangeReader(const File& f, uint64_t begin, uint64_t end, std::vector<uint8_t>& buffer)
      : f_(f), pos_(begin), end_(end), buf_(buffer) {
    if (buf_.size() < kChunk) buf_.resize(kChunk);
  }
  // The next chunk (empty at the end of the range); throws when the file ends first.
  std::pair<const uint8_t*, size_t> next() {
    if (pos_ >= end_) return {nullptr, 0};
    const size_t want = static_cast<size_t>(std::min<uint64_t>(kChunk, end_ - pos_));
    const size_t got = f_.read_at(pos_, buf_.data(), want);
    if (got < want) throw ZipError("");  // the caller names the entry
    pos_ += got;
    return {buf_.data(), got};
  }

 private:
  static constexpr size_t kChunk = size_t(1) << 20;
  const File& f_;
  uint64_t pos_, end_;
  std::vector<uint8_t>& buf_;
};

// --- inflate (RFC 1951), streaming: output goes through a 64 KiB ring (the window is 32 KiB) into CRC-32 --------

class Inflater {
 public:
  // Decodes the deflate stream in `in`; returns false when it is invalid (too much output included). On success
  // `size` and `crc` describe the output, and `out` (when given) holds it (for the manifest, which is small).
  Inflater(RangeReader& in, uint64_t expected_size, std::string* out)
      : in_(in), expected_(expected_size), out_(out), ring_(kRing) {}

  bool run() {
    try {
      bool last = false;
      while (!last) {
        last = bits(1) != 0;
        const uint32_t type = bits(2);
        if (type == 0) {
          stored_block();
        } else if (type == 1) {
          fixed_tables();
          codes();
        } else if (type == 2) {
          dynamic_tables();
          codes();
        } else {
          return false;
        }
      }
      flush_crc();
      return true;
    } catch (const Invalid&) {
      return false;
    }
  }
  uint64_t size() const { return pos_; }
  uint32_t crc() const { return crc_.value(); }

 private:
  struct Invalid {};
  static constexpr size_t kRing = 65536, kMask = kRing - 1, kMaxBits = 15;
  struct Huffman {
    std::array<uint16_t, kMaxBits + 1> count{};
    std::array<uint16_t, 320> symbol{};
  };

  RangeReader& in_;
  uint64_t expected_;
  std::string* out_;
  std::vector<uint8_t> ring_;
  uint64_t pos_ = 0, crc_pos_ = 0;  // bytes written, bytes checksummed
  Crc32 crc_;
  const uint8_t* chunk_ = nullptr;
  size_t chunk_len_ = 0, chunk_pos_ = 0;
  uint64_t bitbuf_ = 0;
  int bitcnt_ = 0;
  Huffman lencode_, distcode_;

  uint32_t byte() {
    if (chunk_pos_ == chunk_len_) {
      auto [p, n] = in_.next();
      if (n == 0) throw Invalid{};  // the stream ends before its last block
      chunk_ = p;
      chunk_len_ = n;
      chunk_pos_ = 0;
    }
    return chunk_[chunk_pos_++];
  }
  uint32_t bits(int n) {
    while (bitcnt_ < n) {
      bitbuf_ |= uint64_t(byte()) << bitcnt_;
      bitcnt_ += 8;
    }
    const uint32_t v = static_cast<uint32_t>(bitbuf_ & ((uint64_t(1) << n) - 1));
    bitbuf_ >>= n;
    bitcnt_ -= n;
    return v;
  }

  void flush_crc() {
    while (crc_pos_ < pos_) {
      const size_t at = static_cast<size_t>(crc_pos_ & kMask);
      const size_t n = static_cast<size_t>(std::min<uint64_t>(pos_ - crc_pos_, kRing - at));
      crc_.update(ring_.data() + at, n);
      if (out_) out_->append(reinterpret_cast<const char*>(ring_.data() + at), n);
      crc_pos_ += n;
    }
  }
  void put(uint8_t b) {
    if (pos_ >= expected_) throw Invalid{};  // more output than the central directory declares
    ring_[pos_ & kMask] = b;
    ++pos_;
    if (pos_ - crc_pos_ >= kRing / 2) flush_crc();  // keeps the last 32 KiB in the ring for back references
  }

  void stored_block() {
    // To the byte boundary: bits() never holds a whole unread byte (it reads at most up to the bits it needs).
    bitbuf_ = 0;
    bitcnt_ = 0;
    const uint32_t len = byte() | byte() << 8;
    const uint32_t nlen = byte() | byte() << 8;
    if ((len ^ 0xFFFF) != nlen) throw Invalid{};
    for (uint32_t i = 0; i < len; ++i) put(static_cast<uint8_t>(byte()));
  }

  // Canonical Huffman code from code lengths (0: unused); false for an over-subscribed set.
  static bool build(Huffman& h, const uint8_t* lengths, int n) {
    h.count.fill(0);
    for (int i = 0; i < n; ++i) ++h.count[lengths[i]];
    if (h.count[0] == n) return true;  // no codes: decoding one fails
    int left = 1;
    for (size_t len = 1; len <= kMaxBits; ++len) {
      left = left * 2 - h.count[len];
      if (left < 0) return false;
    }
    std::array<uint16_t, kMaxBits + 1> offs{};
    for (size_t len = 1; len < kMaxBits; ++len) offs[len + 1] = static_cast<uint16_t>(offs[len] + h.count[len]);
    for (int i = 0; i < n; ++i)
      if (lengths[i]) h.symbol[offs[lengths[i]]++] = static_cast<uint16_t>(i);
    return true;
  }
  int decode(const Huffman& h) {
    int code = 0, first = 0, index = 0;
    for (size_t len = 1; len <= kMaxBits; ++len) {
      code |= static_cast<int>(bits(1));
      const int count = h.count[len];
      if (code - count < first) return h.symbol[static_cast<size_t>(index + (code - first))];
      index += count;
      first = (first + count) << 1;
      code <<= 1;
    }
    throw Invalid{};
  }

  void fixed_tables() {
    uint8_t lengths[288 + 30];
    int i = 0;
    for (; i < 144; ++i) lengths[i] = 8;
    for (; i < 256; ++i) lengths[i] = 9;
    for (; i < 280; ++i) lengths[i] = 7;
    for (; i < 288; ++i) lengths[i] = 8;
    for (; i < 288 + 30; ++i) lengths[i] = 5;
    build(lencode_, lengths, 288);
    build(distcode_, lengths + 288, 30);
  }

  void dynamic_tables() {
    static constexpr uint8_t kOrder[19] = {16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15};
    const int nlen = static_cast<int>(bits(5)) + 257, ndist = static_cast<int>(bits(5)) + 1;
    const int ncode = static_cast<int>(bits(4)) + 4;
    if (nlen > 286 || ndist > 30) throw Invalid{};
    uint8_t lengths[320] = {};
    for (int i = 0; i < ncode; ++i) lengths[kOrder[i]] = static_cast<uint8_t>(bits(3));
    Huffman lencode;
    if (!build(lencode, lengths, 19)) throw Invalid{};
    int index = 0;
    while (index < nlen + ndist) {
      int sym = decode(lencode);
      if (sym < 16) {
        lengths[index++] = static_cast<uint8_t>(sym);
        continue;
      }
      uint8_t len = 0;
      int repeat;
      if (sym == 16) {
        if (index == 0) throw Invalid{};
        len = lengths[index - 1];
        repeat = 3 + static_cast<int>(bits(2));
      } else if (sym == 17) {
        repeat = 3 + static_cast<int>(bits(3));
      } else {
        repeat = 11 + static_cast<int>(bits(7));
      }
      if (index + repeat > nlen + ndist) throw Invalid{};
      while (repeat--) lengths[index++] = len;
    }
    if (lengths[256] == 0) throw Invalid{};  // no end-of-block code
    if (!build(lencode_, lengths, nlen) || !build(distcode_, lengths + nlen, ndist)) throw Invalid{};
  }

  void codes() {
    static constexpr uint16_t kLenBase[29] = {3,  4,  5,  6,  7,  8,  9,  10, 11,  13,  15,  17,  19,  23, 27,
                                              31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258};
    static constexpr uint8_t kLenExtra[29] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2,
                                              2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0};
    static constexpr uint16_t kDistBase[30] = {1,   2,   3,   4,   5,   7,    9,    13,   17,   25,
                                               33,  49,  65,  97,  129, 193,  257,  385,  513,  769,
                                               1025, 1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577};
    static constexpr uint8_t kDistExtra[30] = {0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6,
                                               6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13};
    while (true) {
      int sym = decode(lencode_);
      if (sym < 256) {
        put(static_cast<uint8_t>(sym));
      } else if (sym == 256) {
        return;
      } else {
        sym -= 257;
        if (sym >= 29) throw Invalid{};
        const uint32_t len = kLenBase[sym] + bits(kLenExtra[sym]);
        const int dsym = decode(distcode_);
        if (dsym >= 30) throw Invalid{};
        const uint32_t dist = kDistBase[dsym] + bits(kDistExtra[dsym]);
        if (dist > pos_) throw Invalid{};  // before the start of the output
        for (uint32_t i = 0; i < len; ++i) put(ring_[(pos_ - dist) & kMask]);
      }
    }
  }
};

// --- the archive -------------------------------------------------------------------------------------------------

struct Entry {
  std::string name;
  uint64_t size = 0;  // uncompressed
  uint32_t crc = 0;
};

struct Archive {
  std::vector<Entry> entries;           // central directory order, every one verified
  std::string manifest_name;            // <root>/tur_manifest.json (root: the first entry's top folder)
  std::optional<std::string> manifest;  // its text, when the archive has one
};

namespace detail {

struct Directory {
  uint64_t count = 0, offset = 0, size = 0, end = 0;  // end: where the records after the directory begin
};

inline std::string corrupt(const std::string& why) { return " is corrupt (" + why + ")" + kCopyAgain; }

// The End Of Central Directory record (and ZIP64's when there is one).
inline Directory find_directory(const File& f) {
  const uint64_t n = f.size();
  const size_t tail = static_cast<size_t>(std::min<uint64_t>(n, 22 + 65535));
  std::vector<uint8_t> buf(tail);
  if (f.read_at(n - tail, buf.data(), tail) != tail) throw ZipError(corrupt("cannot read its end"));
  // The last signature whose record (and comment) fits in the file.
  std::optional<size_t> at;
  for (size_t i = tail >= 22 ? tail - 22 + 1 : 0; i-- > 0;) {
    if (le32(&buf[i]) == 0x06054b50 && i + 22 + le16(&buf[i + 20]) <= tail) {
      at = i;
      break;
    }
  }
  if (!at) {
    uint8_t head[4] = {};
    if (f.read_at(0, head, 4) == 4 && le32(head) == 0x04034b50)
      throw ZipError(std::string(" is truncated (its end, the zip central directory, is missing)") + kCopyAgain);
    throw NotAZip("no end of central directory record");
  }
  const uint8_t* e = &buf[*at];
  const uint64_t eocd = n - tail + *at;
  Directory d;
  d.count = le16(e + 10);
  d.size = le32(e + 12);
  d.offset = le32(e + 16);
  d.end = eocd;
  if (le16(e + 4) != 0 || le16(e + 6) != 0 || le16(e + 8) != le16(e + 10))
    throw ZipError(corrupt("a multi-volume or damaged end of central directory record"));
  // ZIP64: a locator 20 bytes before the record points to the ZIP64 end of central directory record.
  if (eocd >= 20) {
    uint8_t loc[20];
    if (f.read_at(eocd - 20, loc, 20) == 20 && le32(loc) == 0x07064b50) {
      const uint64_t z = le64(loc + 8);
      uint8_t rec[56];
      if (z + 56 > eocd - 20 || f.read_at(z, rec, 56) != 56 || le32(rec) != 0x06064b50)
        throw ZipError(corrupt("its ZIP64 end of central directory record is damaged"));
      d.count = le64(rec + 32);
      d.size = le64(rec + 40);
      d.offset = le64(rec + 48);
      d.end = z;
      if (le64(rec + 24) != d.count) throw ZipError(corrupt("a multi-volume ZIP64 central directory"));
    }
  }
  if (d.offset > d.end || d.size > d.end - d.offset)
    throw ZipError(corrupt("its central directory lies outside the file"));
  return d;
}

struct CdEntry {
  std::string name;
  uint16_t flags = 0, method = 0;
  uint32_t crc = 0;
  uint64_t csize = 0, usize = 0, offset = 0;
};

inline std::vector<CdEntry> read_directory(const File& f, const Directory& d) {
  if (d.count > d.size / 46) throw ZipError(corrupt("its central directory is damaged (entry count)"));
  std::vector<uint8_t> cd(static_cast<size_t>(d.size));
  if (f.read_at(d.offset, cd.data(), cd.size()) != cd.size())
    throw ZipError(corrupt("cannot read its central directory"));
  std::vector<CdEntry> out;
  out.reserve(static_cast<size_t>(d.count));
  size_t p = 0;
  for (uint64_t i = 0; i < d.count; ++i) {
    if (p + 46 > cd.size() || le32(&cd[p]) != 0x02014b50)
      throw ZipError(corrupt("its central directory is damaged at record " + std::to_string(i + 1)));
    const uint8_t* r = &cd[p];
    CdEntry e;
    e.flags = le16(r + 8);
    e.method = le16(r + 10);
    e.crc = le32(r + 16);
    e.csize = le32(r + 20);
    e.usize = le32(r + 24);
    const size_t nlen = le16(r + 28), elen = le16(r + 30), clen = le16(r + 32);
    e.offset = le32(r + 42);
    if (p + 46 + nlen + elen + clen > cd.size())
      throw ZipError(corrupt("its central directory is damaged at record " + std::to_string(i + 1)));
    e.name.assign(reinterpret_cast<const char*>(r + 46), nlen);
    // ZIP64 extra field: the 64-bit values of the fields saturated above, in this order.
    const uint8_t* x = r + 46 + nlen;
    for (size_t q = 0; q + 4 <= elen;) {
      const uint16_t id = le16(x + q), len = le16(x + q + 2);
      if (q + 4 + len > elen) break;
      if (id == 0x0001) {
        const uint8_t* v = x + q + 4;
        size_t k = 0;
        auto take = [&](uint64_t& field) {
          if (k + 8 > len) throw ZipError(corrupt("entry " + quote_name(e.name) + " has a damaged ZIP64 record"));
          field = le64(v + k);
          k += 8;
        };
        if (e.usize == 0xFFFFFFFFu) take(e.usize);
        if (e.csize == 0xFFFFFFFFu) take(e.csize);
        if (e.offset == 0xFFFFFFFFu) take(e.offset);
      }
      q += 4 + len;
    }
    out.push_back(std::move(e));
    p += 46 + nlen + elen + clen;
  }
  return out;
}

}  // namespace detail

inline std::string root_folder(const std::vector<Entry>& entries) {
  if (entries.empty()) return "";
  const auto& first = entries.front().name;
  const auto slash = first.find('/');
  return slash == std::string::npos ? "" : first.substr(0, slash);
}

// Verifies every entry of the zip at `path`; throws ZipError (or NotAZip).
inline Archive verify_archive(const std::string& path) {
  File f(path);
  const detail::Directory dir = detail::find_directory(f);
  const std::vector<detail::CdEntry> cd = detail::read_directory(f, dir);
  Archive a;
  a.entries.reserve(cd.size());
  for (const auto& e : cd) a.entries.push_back(Entry{e.name, e.usize, e.crc});
  const std::string root = root_folder(a.entries);
  a.manifest_name = root.empty() ? kManifestName : root + "/" + kManifestName;
  std::vector<uint8_t> buffer;
  for (const auto& e : cd) {
    const std::string who = "entry " + quote_name(e.name);
    uint8_t lh[30];
    if (e.offset > dir.offset || f.read_at(e.offset, lh, 30) != 30 || le32(lh) != 0x04034b50)
      throw ZipError(detail::corrupt(who + " has no local header where the central directory puts it"));
    const uint64_t nlen = le16(lh + 26), elen = le16(lh + 28);
    std::string local_name(static_cast<size_t>(nlen), '\0');
    if (f.read_at(e.offset + 30, local_name.data(), local_name.size()) != nlen || local_name != e.name)
      throw ZipError(detail::corrupt(who + " has a damaged local header"));
    const uint64_t begin = e.offset + 30 + nlen + elen;
    if (begin > dir.offset || e.csize > dir.offset - begin)
      throw ZipError(detail::corrupt(who + " runs past the start of the central directory"));
    if (e.flags & 0x0001)
      throw ZipError(" has the encrypted entry " + quote_name(e.name) + ", which the runner cannot verify; re-export it");
    const bool is_manifest = e.name == a.manifest_name;
    if (is_manifest && e.usize > (uint64_t(16) << 20))
      throw ZipError(": its " + std::string(kManifestName) + " is implausibly large (" + std::to_string(e.usize) +
                     " bytes); re-export it");
    std::string text;
    RangeReader in(f, begin, begin + e.csize, buffer);
    uint64_t size = 0;
    uint32_t crc = 0;
    try {
      if (e.method == 0) {
        if (e.csize != e.usize)
          throw ZipError(detail::corrupt(who + " is stored in " + std::to_string(e.csize) + " bytes but declares " +
                                         std::to_string(e.usize)));
        Crc32 c;
        while (true) {
          const auto [p, n] = in.next();
          if (n == 0) break;
          c.update(p, n);
          if (is_manifest) text.append(reinterpret_cast<const char*>(p), n);
          size += n;
        }
        crc = c.value();
      } else if (e.method == 8) {
        Inflater inflate(in, e.usize, is_manifest ? &text : nullptr);
        if (!inflate.run()) throw ZipError(detail::corrupt(who + " has damaged compressed data"));
        size = inflate.size();
        crc = inflate.crc();
      } else {
        throw ZipError(" has entry " + quote_name(e.name) + " compressed with method " + std::to_string(e.method) +
                       ", which the runner cannot verify (it reads stored and deflated entries); re-export it");
      }
    } catch (const ZipError& err) {
      if (std::string_view(err.what()).empty())  // RangeReader: the file ended inside the entry
        throw ZipError(std::string(" is truncated (entry ") + quote_name(e.name) + " is cut short)" + kCopyAgain);
      throw;
    }
    if (size != e.usize)
      throw ZipError(detail::corrupt(who + " holds " + std::to_string(size) + " bytes, its record says " +
                                     std::to_string(e.usize)));
    if (crc != e.crc) throw ZipError(detail::corrupt(who + " fails its CRC-32 check"));
    if (is_manifest) a.manifest = std::move(text);
  }
  return a;
}

inline std::string hex32(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}

// The archive against its manifest (when it has one): every listed entry present with the listed size and CRC-32,
// and every shared library (.so) listed. Throws ZipError.
inline void check_manifest(const Archive& a) {
  if (!a.manifest) return;  // an export without one (TorchScript, older packages): the CRCs were the check
  const std::string altered = ": the package was altered after export";
  auto unreadable = [&](const std::string& why) {
    return ZipError(": its " + std::string(kManifestName) + " is unreadable (" + why + "); re-export it");
  };
  tur::json::Value v;
  try {
    v = tur::json::parse(*a.manifest);
  } catch (const std::exception& e) {
    throw unreadable(e.what());
  }
  const auto* format = v.find("format");
  const auto* listed = v.find("entries");
  if (!format || format->type != tur::json::Value::Type::String || format->string != kManifestFormat)
    throw unreadable("no \"format\": \"" + std::string(kManifestFormat) + "\"");
  if (const auto* ver = v.find("version"); ver && ver->type == tur::json::Value::Type::Number && ver->number > 1)
    throw ZipError(": its " + std::string(kManifestName) + " has version " +
                   std::to_string(static_cast<long long>(ver->number)) +
                   ", newer than this runner reads (1); use a newer runner");
  if (!listed || listed->type != tur::json::Value::Type::Object) throw unreadable("no \"entries\" object");
  std::unordered_map<std::string_view, const Entry*> present;
  for (const auto& e : a.entries) present.emplace(e.name, &e);
  auto whole = [](const tur::json::Value* n, double limit) {
    return n && n->type == tur::json::Value::Type::Number && n->number >= 0 && n->number <= limit &&
           n->number == static_cast<double>(static_cast<uint64_t>(n->number));
  };
  std::unordered_map<std::string_view, bool> in_manifest;
  for (const auto& [name, want] : listed->object) {
    in_manifest.emplace(name, true);
    if (name == a.manifest_name) continue;  // a manifest cannot hold its own checksum
    const auto* size = want.find("size");
    const auto* crc = want.find("crc32");
    if (!whole(size, 9007199254740992.0) || !whole(crc, 4294967295.0))
      throw unreadable("entry " + quote_name(name) + " needs an integer size and crc32");
    const auto it = present.find(name);
    if (it == present.end()) throw ZipError(": it lacks entry " + quote_name(name) + ", which the export wrote" + altered);
    const Entry& e = *it->second;
    const auto want_size = static_cast<uint64_t>(size->number);
    const auto want_crc = static_cast<uint32_t>(crc->number);
    if (e.size != want_size)
      throw ZipError(": entry " + quote_name(name) + " is " + std::to_string(e.size) + " bytes, the export wrote " +
                     std::to_string(want_size) + altered);
    if (e.crc != want_crc)
      throw ZipError(": entry " + quote_name(name) + " has CRC-32 " + hex32(e.crc) + ", the export wrote " +
                     hex32(want_crc) + " (same size, other contents)" + altered);
  }
  for (const auto& e : a.entries) {
    const bool library = e.name.size() > 3 && e.name.compare(e.name.size() - 3, 3, ".so") == 0;
    if (library && !in_manifest.count(e.name))
      throw ZipError(": library " + quote_name(e.name) + " is not in the export's manifest" + altered);
  }
}

}  // namespace tur::zip
