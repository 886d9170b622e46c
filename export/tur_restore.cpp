// tur-restore: restore one image with a model exported by `tur export` (TorchScript .pt or AOTInductor .pt2).
//
//   tur-restore --model PATH --input IN --output OUT [--tile N [--overlap M]] [--device cpu|cuda[:N]] [--half]
//
// The same procedure as `tur restore` (tur_ext/inference.py): float RGB in [0, 1] -> the model's input value range
// and channel order -> reflect-pad to the size multiple (and the smallest input size) -> whole image or overlapping
// tiles blended with linear ramps (tiling.hpp) -> crop -> back from the model's output range -> clamp -> 8-bit
// (16-bit when the input is 16-bit and the output is PNG/TIFF). With --tile the image is never held in float: tiles
// are gathered from the decoded samples and blended one band (row of tiles) at a time, with the same arithmetic
// (restore_tiled), so memory is the input and output samples plus one band.
// Before anything is loaded: the output must not be the input, and the model archive must be intact (every entry's
// CRC-32, and a .pt2 against its export manifest; zip_check.hpp). A NaN or inf in the model's output is an error.
// Errors are one line on stderr, "tur-restore: error: ...", with the exit codes listed in kUsage.
#include <c10/util/Exception.h>
#include <caffe2/serialize/inline_container.h>
#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/cuda.h>
#include <torch/script.h>
#include <torch/torch.h>
#include <torch/version.h>
#include <fcntl.h>
#include <malloc.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "json_min.hpp"
#include "tiling.hpp"
#include "zip_check.hpp"

namespace fs = std::filesystem;

namespace {

constexpr const char* kUsage =
    "usage: tur-restore --model PATH --input IN --output OUT [--tile N [--overlap M]] [--device cpu|cuda[:N]] "
    "[--half]\n"
    "\n"
    "Restore one image with a model exported by `tur export` (.pt TorchScript or .pt2 AOTInductor).\n"
    "  --model PATH    the exported model; its metadata gives the size rule, value ranges and channel order\n"
    "  --input IN      PNG, JPEG or TIFF (8- or 16-bit, gray or color)\n"
    "  --output OUT    the restored image; 16-bit when the input is 16-bit and OUT is .png/.tif/.tiff\n"
    "  --tile N        process tiles of N pixels (rounded down to the size multiple; 0: whole image, default)\n"
    "  --overlap M     tile overlap in pixels (default min(32, tile/2))\n"
    "  --device D      cpu (default), cuda or cuda:N\n"
    "  --half          fp16 inference (CUDA only; models that support it)\n"
    "  --benchmark K   developer option: run the restoration K more times and print timings to stderr\n"
    "\n"
    "exit status: 0 ok, 1 inference failed, 2 usage or option error, 3 model error, 4 input image error,\n"
    "             5 output error\n";

enum ExitCode { kOk = 0, kFailed = 1, kUsageError = 2, kModelError = 3, kInputError = 4, kOutputError = 5 };

struct RunnerError {
  int code;
  std::string message;
};

[[noreturn]] void fail(int code, std::string message) { throw RunnerError{code, std::move(message)}; }

std::string in_quotes(const std::string& s) { return "'" + s + "'"; }

// The first line of an exception message: torch errors carry backtraces and context lines.
std::string first_line(const std::string& what) {
  auto end = what.find('\n');
  return end == std::string::npos ? what : what.substr(0, end);
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

// --- options --------------------------------------------------------------------------------------------------------

struct Options {
  std::string model, input, output, device = "cpu";
  int64_t tile = 0;
  std::optional<int64_t> overlap;
  bool half = false;
  int64_t benchmark = 0;
};

int64_t parse_int(const std::string& option, const std::string& text) {
  int64_t value = 0;
  const char* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(text.data(), end, value);
  if (ec != std::errc() || ptr != end) fail(kUsageError, option + ": expected an integer, got " + in_quotes(text));
  return value;
}

Options parse_args(int argc, char** argv) {
  Options o;
  bool have_model = false, have_input = false, have_output = false;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      std::cout << kUsage;
      std::exit(kOk);
    }
    if (arg == "--half") {
      o.half = true;
      continue;
    }
    if (arg.rfind("--", 0) != 0)
      fail(kUsageError, "unexpected argument " + in_quotes(arg) + " (options are --model, --input, --output, ...)");
    std::string value;
    const auto eq = arg.find('=');
    const bool inline_value = eq != std::string::npos;  // --option=value
    if (inline_value) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
    }
    static const char* const kValueOptions[] = {"--model", "--input", "--output", "--device", "--tile", "--overlap",
                                                "--benchmark"};
    if (std::find(std::begin(kValueOptions), std::end(kValueOptions), arg) == std::end(kValueOptions))
      fail(kUsageError, "unknown option " + in_quotes(arg) + " (see --help)");
    if (!inline_value) {
      if (i + 1 >= argc) fail(kUsageError, arg + ": expected a value");
      value = argv[++i];
    }
    if (arg == "--model") { o.model = value; have_model = true; }
    else if (arg == "--input") { o.input = value; have_input = true; }
    else if (arg == "--output") { o.output = value; have_output = true; }
    else if (arg == "--device") o.device = value;
    else if (arg == "--tile") o.tile = parse_int("--tile", value);
    else if (arg == "--overlap") o.overlap = parse_int("--overlap", value);
    else o.benchmark = std::max<int64_t>(0, parse_int("--benchmark", value));
  }
  if (!have_model || o.model.empty()) fail(kUsageError, "--model: required (the exported .pt or .pt2)");
  if (!have_input || o.input.empty()) fail(kUsageError, "--input: required (the image to restore)");
  if (!have_output || o.output.empty()) fail(kUsageError, "--output: required (where to write the result)");
  if (o.tile < 0) fail(kUsageError, "--tile: expected a positive number of pixels (or 0 for none), got " +
                                        std::to_string(o.tile));
  return o;
}

torch::Device parse_device(const std::string& text) {
  if (text == "cpu") return torch::kCPU;
  if (text == "cuda" || text.rfind("cuda:", 0) == 0) {
    if (!torch::cuda::is_available())
      fail(kUsageError, "--device: " + in_quotes(text) + " requested but CUDA is not available to this runner");
    int64_t index = text == "cuda" ? 0 : parse_int("--device", text.substr(5));
    if (index < 0 || index >= static_cast<int64_t>(torch::cuda::device_count()))
      fail(kUsageError, "--device: no CUDA device " + std::to_string(index));
    return torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(index));
  }
  fail(kUsageError, "--device: expected cpu, cuda or cuda:N, got " + in_quotes(text));
}

// Codec libraries (libpng, libtiff) print their own warnings on stderr; the runner reports one line per error, so
// their chatter is silenced while OpenCV decodes or encodes.
class SilenceStderr {
 public:
  SilenceStderr() {
    std::fflush(stderr);
    saved_ = dup(STDERR_FILENO);
    int null = open("/dev/null", O_WRONLY);
    if (saved_ >= 0 && null >= 0) dup2(null, STDERR_FILENO);
    if (null >= 0) close(null);
  }
  ~SilenceStderr() {
    std::fflush(stderr);
    if (saved_ >= 0) {
      dup2(saved_, STDERR_FILENO);
      close(saved_);
    }
  }
  SilenceStderr(const SilenceStderr&) = delete;
  SilenceStderr& operator=(const SilenceStderr&) = delete;

 private:
  int saved_ = -1;
};

// --- images ---------------------------------------------------------------------------------------------------------

struct Image {
  cv::Mat samples;  // as decoded: 8- or 16-bit or float, 1-4 channels (BGR(A) order), continuous
  bool sixteen_bit = false;
};

// As tur_ext.data.io.read_image: checks the file and decodes it; the samples are converted to float only when (and
// where) they are restored (samples_to_rgb).
Image read_image(const std::string& path) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) fail(kInputError, "--input " + in_quotes(path) + ": no such file");
  cv::Mat img;
  try {
    SilenceStderr quiet;
    img = cv::imread(path, cv::IMREAD_UNCHANGED);
  } catch (const cv::Exception& e) {
    if (e.code == cv::Error::StsNoMem)
      fail(kInputError, "--input " + in_quotes(path) + ": not enough memory to decode it");
    fail(kInputError, "--input " + in_quotes(path) + ": cannot read image: " + first_line(e.what()));
  }
  if (img.empty()) fail(kInputError, "--input " + in_quotes(path) + ": not a readable image (PNG, JPEG, TIFF, ...)");
  const int channels = img.channels();
  if (channels < 1 || channels > 4)
    fail(kInputError, "--input " + in_quotes(path) + ": unsupported channel count " + std::to_string(channels));
  const int depth = img.depth();
  if (depth != CV_8U && depth != CV_16U && depth != CV_32F && depth != CV_64F)
    fail(kInputError, "--input " + in_quotes(path) + ": unsupported pixel type (expected 8- or 16-bit, or float)");
  Image out;
  out.samples = img.isContinuous() ? img : img.clone();
  out.sixteen_bit = depth == CV_16U;
  return out;
}

// Decoded samples (H, W, C) -> (1, 3, H, W) float32 RGB in [0, 1], CPU: 8/16-bit scaled by their full range, float
// clamped, gray repeated, alpha left out (run() carries it over to the output). The whole image and every tile of it go through this one function, so a
// tile's values are exactly those of the same pixels in the whole image.
torch::Tensor samples_to_rgb(const cv::Mat& img) {
  const cv::Mat c = img.isContinuous() ? img : img.clone();
  const int channels = c.channels(), depth = c.depth();
  torch::Tensor t;
  if (depth == CV_8U) {
    t = torch::from_blob(c.data, {c.rows, c.cols, channels}, torch::kUInt8).to(torch::kFloat) / 255.0;
  } else if (depth == CV_16U) {
    cv::Mat wide;
    c.convertTo(wide, CV_32S);  // exact; int32 has full support in torch
    t = torch::from_blob(wide.data, {c.rows, c.cols, channels}, torch::kInt).to(torch::kFloat) / 65535.0;
  } else {
    cv::Mat f;
    c.convertTo(f, CV_32F);
    t = torch::from_blob(f.data, {c.rows, c.cols, channels}, torch::kFloat).clone().clamp(0.0, 1.0);
  }
  if (channels <= 2) {
    t = t.narrow(2, 0, 1).expand({-1, -1, 3});  // gray (+ alpha) -> RGB
  } else {
    t = t.narrow(2, 0, 3).flip({2});  // OpenCV's BGR(A) -> RGB
  }
  return t.permute({2, 0, 1}).unsqueeze(0).contiguous();
}

// The samples at rows[y0, y0 + th) x cols[x0, x0 + tw) of `src` (index maps into its rows and columns), as a Mat of
// the same type: a tile of the padded image, read from the unpadded one.
cv::Mat gather_tile(const cv::Mat& src, const std::vector<int64_t>& rows, const std::vector<int64_t>& cols,
                    int64_t y0, int64_t x0, int64_t th, int64_t tw) {
  cv::Mat tile(static_cast<int>(th), static_cast<int>(tw), src.type());
  const size_t es = src.elemSize();
  for (int64_t i = 0; i < th; ++i) {
    const uchar* s = src.ptr(static_cast<int>(rows[static_cast<size_t>(y0 + i)]));
    uchar* d = tile.ptr(static_cast<int>(i));
    for (int64_t j = 0; j < tw;) {  // runs of consecutive source columns in one copy
      const int64_t c0 = cols[static_cast<size_t>(x0 + j)];
      int64_t n = 1;
      while (j + n < tw && cols[static_cast<size_t>(x0 + j + n)] == c0 + n) ++n;
      std::memcpy(d + static_cast<size_t>(j) * es, s + static_cast<size_t>(c0) * es, static_cast<size_t>(n) * es);
      j += n;
    }
  }
  return tile;
}

bool holds_sixteen_bit(const std::string& path) {
  auto ext = lower(fs::path(path).extension().string());
  return ext == ".png" || ext == ".tif" || ext == ".tiff";
}

// Checked before the (possibly long) inference: a format OpenCV can write, and a folder we can create a file in.
void check_output(const std::string& path) {
  if (!cv::haveImageWriter(path))
    fail(kOutputError, "--output " + in_quotes(path) + ": unsupported image format " +
                           in_quotes(fs::path(path).extension().string()) + " (use .png, .jpg or .tif)");
  fs::path parent = fs::path(path).parent_path();
  std::error_code ec;
  if (!parent.empty() && !fs::is_directory(parent, ec)) {
    fs::create_directories(parent, ec);
    if (ec) fail(kOutputError, "--output " + in_quotes(path) + ": cannot create its folder: " + ec.message());
  }
  if (fs::is_directory(path, ec)) fail(kOutputError, "--output " + in_quotes(path) + ": is a folder");
  fs::path probe = (parent.empty() ? fs::path(".") : parent) / (".tur-restore-probe-" + std::to_string(getpid()));
  std::ofstream f(probe);
  if (!f) fail(kOutputError, "--output " + in_quotes(path) + ": cannot write in " + in_quotes(probe.parent_path()));
  f.close();
  fs::remove(probe, ec);
}

// Float RGB in [0, 1] (1, 3, H, W) -> the file's samples, (H, W) BGR 8- or 16-bit.
cv::Mat to_file_pixels(const torch::Tensor& rgb, bool sixteen_bit) {
  const double scale = sixteen_bit ? 65535.0 : 255.0;
  // round(clip(x, 0, 1) * scale) in float32, ties to even: the same arithmetic as tur_ext.inference.to_file_pixels.
  auto hwc = (rgb[0].to(torch::kCPU, torch::kFloat).clamp(0.0, 1.0) * scale).round();
  hwc = hwc.flip({0}).permute({1, 2, 0}).to(torch::kInt).contiguous();  // RGB -> BGR, HxWx3
  const int rows = static_cast<int>(hwc.size(0)), cols = static_cast<int>(hwc.size(1));
  cv::Mat wide(rows, cols, CV_32SC3, hwc.data_ptr<int32_t>());
  cv::Mat pixels;
  wide.convertTo(pixels, sixteen_bit ? CV_16U : CV_8U);  // exact: the values are integers in range
  return pixels;
}

bool holds_alpha(const std::string& path) {
  auto ext = lower(fs::path(path).extension().string());
  return ext == ".png" || ext == ".tif" || ext == ".tiff" || ext == ".webp";
}

// The restored BGR samples plus the input's alpha (its last channel), at the output's depth: 8 <-> 16 bit by 257,
// float alpha like the colour, round(clip(a, 0, 1) * max); as tur_ext.inference._with_alpha.
cv::Mat with_alpha(const cv::Mat& pixels, const cv::Mat& samples) {
  cv::Mat alpha, out;
  cv::extractChannel(samples, alpha, samples.channels() - 1);
  const int want = pixels.depth();
  if (alpha.depth() == CV_32F || alpha.depth() == CV_64F) {
    auto t = torch::from_blob(alpha.ptr(), {alpha.rows, alpha.cols},
                              alpha.depth() == CV_32F ? torch::kFloat : torch::kDouble)
                 .to(torch::kFloat)
                 .clamp(0.0, 1.0)
                 .mul(want == CV_16U ? 65535.0 : 255.0)
                 .round()
                 .to(torch::kInt)
                 .contiguous();
    cv::Mat(alpha.rows, alpha.cols, CV_32SC1, t.data_ptr<int32_t>()).convertTo(alpha, want);
  } else if (alpha.depth() != want) {
    alpha.convertTo(alpha, want, want == CV_16U ? 257.0 : 1.0 / 257.0);  // x / 257 is never a tie
  }
  cv::Mat parts[] = {pixels, alpha};
  cv::merge(parts, 2, out);
  return out;
}

// The samples -> file, atomically (temporary file in the same folder, then rename).
void write_image(const std::string& path, const cv::Mat& pixels) {
  fs::path target(path);
  fs::path tmp = target.parent_path() /
                 ("." + target.stem().string() + ".tmp-" + std::to_string(getpid()) + target.extension().string());
  bool ok = false;
  std::string why;
  try {
    SilenceStderr quiet;
    ok = cv::imwrite(tmp.string(), pixels);
  } catch (const cv::Exception& e) {
    why = first_line(e.what());
  }
  std::error_code ec;
  if (!ok) {
    fs::remove(tmp, ec);
    fail(kOutputError, "--output " + in_quotes(path) + ": cannot write the image" + (why.empty() ? "" : ": " + why));
  }
  fs::permissions(tmp, fs::perms::owner_read | fs::perms::owner_write | fs::perms::group_read |
                           fs::perms::others_read, ec);
  fs::rename(tmp, target, ec);
  if (ec) {
    fs::remove(tmp, ec);
    fail(kOutputError, "--output " + in_quotes(path) + ": cannot write the image: " + ec.message());
  }
}

// Whether writing `output` would replace `input`: the same path once normalised (also when neither exists yet), the
// same path after resolving symbolic links, or the same file (a hard link).
bool same_file(const std::string& input, const std::string& output) {
  std::error_code ec1, ec2;
  const fs::path a = fs::absolute(input, ec1).lexically_normal(), b = fs::absolute(output, ec2).lexically_normal();
  if (!ec1 && !ec2 && a == b) return true;
  const fs::path ca = fs::weakly_canonical(input, ec1), cb = fs::weakly_canonical(output, ec2);
  if (!ec1 && !ec2 && ca == cb) return true;
  if (fs::exists(input, ec1) && fs::exists(output, ec2)) {
    std::error_code ec;
    if (fs::equivalent(input, output, ec) && !ec) return true;
  }
  return false;
}

// --- models ---------------------------------------------------------------------------------------------------------

constexpr const char* kMetadataRecord = "extra/tur_meta.json";  // TorchScript extra file (tur_ext/export.py)
constexpr const char* kMetadataKey = "tur_meta";                 // AOTInductor package metadata key

enum class Artifact { TorchScript, Aoti };

struct Metadata {
  Artifact artifact = Artifact::TorchScript;
  std::string arch, channel_order = "RGB", dtype = "float32", device = "cpu", torch_version, torchscript_mode;
  int64_t size_multiple = 1, min_size = 1, in_channels = 3, max_side = 0;  // max_side 0: no limit
  double lo = 0.0, hi = 1.0;          // value_range: the model's input range
  double out_lo = 0.0, out_hi = 1.0;  // output_range (value_range where the metadata has none)
  bool supports_fp16 = false;
};

std::string model_error_prefix(const std::string& path) { return "--model " + in_quotes(path) + ": "; }

Metadata parse_metadata(const std::string& path, const std::string& text, Artifact artifact) {
  tur::json::Value v;
  try {
    v = tur::json::parse(text);
  } catch (const std::exception& e) {
    fail(kModelError, model_error_prefix(path) + "unreadable tur_ext metadata: " + e.what());
  }
  auto str = [&](const char* key) -> std::string {
    const auto* f = v.find(key);
    if (!f || f->type != tur::json::Value::Type::String)
      fail(kModelError, model_error_prefix(path) + "metadata has no string " + in_quotes(key));
    return f->string;
  };
  auto num = [&](const char* key) -> double {
    const auto* f = v.find(key);
    if (!f || f->type != tur::json::Value::Type::Number)
      fail(kModelError, model_error_prefix(path) + "metadata has no number " + in_quotes(key));
    return f->number;
  };
  if (v.type != tur::json::Value::Type::Object || !v.find("format") || str("format") != "tur_ext.export")
    fail(kModelError, model_error_prefix(path) + "no tur_ext export metadata (export the model with `tur export`)");
  if (num("format_version") > 1)
    fail(kModelError, model_error_prefix(path) + "export format version " +
                          std::to_string(static_cast<int>(num("format_version"))) +
                          " is newer than this runner reads (1)");
  Metadata m;
  m.artifact = artifact;
  m.arch = str("arch");
  m.size_multiple = static_cast<int64_t>(num("size_multiple"));
  m.in_channels = v.find("in_channels") ? static_cast<int64_t>(num("in_channels")) : 3;
  m.channel_order = str("channel_order");
  m.dtype = str("dtype");
  m.device = str("device");
  m.torch_version = str("torch_version");
  if (const auto* f = v.find("torchscript_mode"); f && f->type == tur::json::Value::Type::String)
    m.torchscript_mode = f->string;
  if (const auto* f = v.find("max_side"); f && f->type == tur::json::Value::Type::Number)
    m.max_side = static_cast<int64_t>(f->number);
  if (const auto* f = v.find("supports_fp16"); f && f->type == tur::json::Value::Type::Bool)
    m.supports_fp16 = f->boolean;
  auto range = [&](const char* key, double& lo, double& hi) {
    const auto* r = v.find(key);
    if (!r || r->type != tur::json::Value::Type::Array || r->array.size() != 2 ||
        r->array[0].type != tur::json::Value::Type::Number || r->array[1].type != tur::json::Value::Type::Number)
      fail(kModelError, model_error_prefix(path) + "metadata " + key + " must be [low, high]");
    lo = r->array[0].number;
    hi = r->array[1].number;
    if (!(hi > lo)) fail(kModelError, model_error_prefix(path) + "metadata " + key + " must be increasing");
  };
  range("value_range", m.lo, m.hi);
  m.out_lo = m.lo;
  m.out_hi = m.hi;
  if (v.find("output_range")) range("output_range", m.out_lo, m.out_hi);
  if (m.size_multiple < 1) fail(kModelError, model_error_prefix(path) + "metadata size_multiple must be >= 1");
  m.min_size = v.find("min_size") ? static_cast<int64_t>(num("min_size")) : m.size_multiple;
  if (m.min_size < 1) fail(kModelError, model_error_prefix(path) + "metadata min_size must be >= 1");
  if (m.channel_order != "RGB" && m.channel_order != "BGR")
    fail(kModelError, model_error_prefix(path) + "metadata channel_order must be RGB or BGR");
  if (m.in_channels != 3)
    fail(kModelError, model_error_prefix(path) + "the runner restores 3-channel images; the model takes " +
                          std::to_string(m.in_channels));
  return m;
}

std::string release(const std::string& version) { return version.substr(0, version.find('+')); }

// Every entry of the archive against its CRC-32 (and a .pt2 against its manifest) before torch reads any of it
// (zip_check.hpp). A file that is no zip at all passes here and is named "not a model" below.
void verify_model_file(const std::string& path) {
  try {
    tur::zip::check_manifest(tur::zip::verify_archive(path));
  } catch (const tur::zip::NotAZip&) {
  } catch (const tur::zip::ZipError& e) {
    fail(kModelError, "--model " + in_quotes(path) + e.what());
  } catch (const std::bad_alloc&) {
    fail(kModelError, "--model " + in_quotes(path) + " is corrupt (its central directory declares an impossible "
                                                     "size); re-export or copy it again");
  }
}

// What the file is, from its archive records, and its metadata; nothing is loaded yet.
Metadata inspect_model(const std::string& path) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) fail(kModelError, model_error_prefix(path) + "no such file");
  verify_model_file(path);
  std::vector<std::string> records;
  std::unique_ptr<caffe2::serialize::PyTorchStreamReader> reader;
  try {
    reader = std::make_unique<caffe2::serialize::PyTorchStreamReader>(path);
    records = reader->getAllRecords();
  } catch (const std::exception&) {
    fail(kModelError, model_error_prefix(path) + "not a model (expected a TorchScript .pt or an AOTInductor .pt2 "
                                                 "written by `tur export`)");
  }
  auto has = [&](const std::string& name) { return std::find(records.begin(), records.end(), name) != records.end(); };
  bool aoti = std::any_of(records.begin(), records.end(),
                          [](const std::string& r) { return r.rfind("data/aotinductor/", 0) == 0; });
  if (aoti) {
    std::unordered_map<std::string, std::string> entries;
    try {
      entries = torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(path, "model");
    } catch (const std::exception& e) {
      fail(kModelError, model_error_prefix(path) + "unreadable AOTInductor package: " + first_line(e.what()));
    }
    auto it = entries.find(kMetadataKey);
    if (it == entries.end())
      fail(kModelError, model_error_prefix(path) + "an AOTInductor package without tur_ext metadata (export the "
                                                   "model with `tur export`)");
    Metadata m = parse_metadata(path, it->second, Artifact::Aoti);
    if (release(m.torch_version) != release(TORCH_VERSION))
      fail(kModelError, model_error_prefix(path) + "compiled by torch " + m.torch_version + ", but this runner uses "
                        "torch " + TORCH_VERSION + "; an AOTInductor package only loads with the torch release that "
                        "compiled it - re-export it with this torch (`tur export ... --format aoti`), or use the "
                        "TorchScript export");
    return m;
  }
  if (has(kMetadataRecord)) {
    auto [data, size] = reader->getRecord(kMetadataRecord);
    std::string text(static_cast<const char*>(data.get()), size);
    return parse_metadata(path, text, Artifact::TorchScript);
  }
  if (has("constants.pkl"))
    fail(kModelError, model_error_prefix(path) + "a TorchScript file without tur_ext metadata (export the model with "
                                                 "`tur export`)");
  if (has("data.pkl"))
    fail(kModelError, model_error_prefix(path) + "a training checkpoint, not an exported model; export it first: "
                                                 "tur export " + path + " --format torchscript --out model.pt");
  fail(kModelError, model_error_prefix(path) + "not a model (expected a TorchScript .pt or an AOTInductor .pt2 "
                                               "written by `tur export`)");
}

// The dtype to run in, or an error saying why the request cannot be met (tur_ext.export._resolve_dtype).
torch::ScalarType resolve_dtype(const Metadata& m, const torch::Device& device, bool half, const std::string& path) {
  if (half) {
    if (!m.supports_fp16)
      fail(kUsageError, "--half: " + m.arch + " (" + in_quotes(path) + ") declares that it does not support fp16");
    if (!device.is_cuda()) fail(kUsageError, "--half: fp16 inference needs --device cuda");
  }
  if (m.artifact == Artifact::Aoti || m.torchscript_mode == "trace") {
    if (half && m.dtype != "float16")
      fail(kUsageError, "--half: " + in_quotes(path) + " was exported in " + m.dtype + "; export it with --half for fp16");
    if (m.dtype == "float16" && !device.is_cuda())
      fail(kUsageError, "--device: " + in_quotes(path) + " was exported in fp16, which needs --device cuda");
    return m.dtype == "float16" ? torch::kHalf : torch::kFloat;
  }
  return half ? torch::kHalf : torch::kFloat;
}

// Module::to(dtype) would also cast integer buffers (index tables such as Uformer's relative position index);
// like Python's nn.Module.to, only floating-point tensors change dtype.
void cast_floating(torch::jit::Module& module, torch::ScalarType dtype) {
  for (const auto& p : module.named_parameters(/*recurse=*/true))
    if (p.value.is_floating_point() && p.value.scalar_type() != dtype) p.value.set_data(p.value.to(dtype));
  for (const auto& b : module.named_buffers(/*recurse=*/true))
    if (b.value.is_floating_point() && b.value.scalar_type() != dtype) b.value.set_data(b.value.to(dtype));
}

class Model {
 public:
  Model(const std::string& path, const Metadata& meta, const torch::Device& device, torch::ScalarType dtype)
      : meta_(meta), device_(device), dtype_(dtype) {
    try {
      if (meta.artifact == Artifact::Aoti) {
        if ((meta.device == "cuda") != device.is_cuda())
          fail(kUsageError, "--device: " + in_quotes(path) + " was compiled for " + meta.device +
                                "; an AOTInductor package only runs on the device type it was compiled for");
        aoti_ = std::make_unique<torch::inductor::AOTIModelPackageLoader>(
            path, "model", false, 1, device.is_cuda() ? device.index() : static_cast<c10::DeviceIndex>(-1));
      } else {
        module_ = torch::jit::load(path, device);
        module_.eval();
        cast_floating(module_, dtype);
      }
    } catch (const c10::Error& e) {
      fail(kModelError, model_error_prefix(path) + "cannot load: " + first_line(e.what_without_backtrace()));
    } catch (const std::exception& e) {
      fail(kModelError, model_error_prefix(path) + "cannot load: " + first_line(e.what()));
    }
  }

  int64_t size_multiple() const { return meta_.size_multiple; }
  int64_t min_size() const { return meta_.min_size; }

  // (B, C, H, W) with H, W multiples of the size multiple -> the model's output, in its dtype.
  torch::Tensor operator()(const torch::Tensor& x) {
    auto in = x.to(device_, dtype_).contiguous();
    if (aoti_) return aoti_->run({in}).at(0);
    return module_.forward({in}).toTensor();
  }

  // Value ranges and channel order of the model (tur_ext.inference.Restorer._to_model / _from_model).
  torch::Tensor to_model(torch::Tensor x) const {
    if (meta_.lo != 0.0 || meta_.hi != 1.0) x = x * (meta_.hi - meta_.lo) + meta_.lo;
    return meta_.channel_order == "BGR" ? x.flip({1}) : x;
  }
  torch::Tensor from_model(torch::Tensor y) const {
    y = y.to(torch::kFloat);
    if (meta_.channel_order == "BGR") y = y.flip({1});
    if (meta_.out_lo != 0.0 || meta_.out_hi != 1.0) y = (y - meta_.out_lo) / (meta_.out_hi - meta_.out_lo);
    return y.clamp(0.0, 1.0);
  }

 private:
  Metadata meta_;
  torch::Device device_;
  torch::ScalarType dtype_;
  torch::jit::Module module_;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> aoti_;
};

[[noreturn]] void fail_non_finite(const std::string& model_path, const std::string& input_path) {
  fail(kFailed, "model " + in_quotes(model_path) + " produced non-finite values on " + in_quotes(input_path) +
                    "; nothing written");
}

// The whole image at once: (1, 3, H, W) float RGB in [0, 1] -> the same, restored.
torch::Tensor restore_whole(Model& model, const torch::Tensor& rgb, const torch::Device& device,
                            const std::string& model_path, const std::string& input_path) {
  const int64_t h = rgb.size(-2), w = rgb.size(-1);
  auto x = model.to_model(rgb.to(device, torch::kFloat));
  auto padded = tur::pad_to_multiple(x, model.size_multiple(), model.min_size());
  auto out = model(padded).narrow(-2, 0, h).narrow(-1, 0, w);
  if (!torch::isfinite(out).all().item<bool>()) fail_non_finite(model_path, input_path);
  return model.from_model(out);
}

// Tiled, in bounded memory: the decoded samples in, the file's samples out ((H, W) BGR 8- or 16-bit), and in between
// one band (a row of tiles) of float accumulators, never the float or padded image. The result is bit for bit that
// of tur::run_tiled on the padded float image (tur_ext.inference.Restorer.restore_file_pixels does the same):
//  * a tile of the padded image is gathered from the samples through the padding's row and column index maps
//    (tur::reflect_index, the rule of pad_to_multiple) and converted like the whole image (samples_to_rgb,
//    Model::to_model): element-wise operations, so each value is the one the padded float image holds;
//  * the tiles are visited in the same order (bands top to bottom, tiles left to right) and each adds out * weight
//    and weight into accumulators of (C, tile_h, padded_W) and (tile_h, padded_W) for its band: every pixel sees the
//    same float32 additions in the same order;
//  * rows above the next band's first row receive nothing more: they are divided, mapped back, rounded and written
//    to the output; the rest move up to the top of the accumulators, which start the next band.
cv::Mat restore_tiled(Model& model, const cv::Mat& samples, const torch::Device& device, int64_t tile,
                      int64_t overlap, bool sixteen_bit, const std::string& model_path,
                      const std::string& input_path) {
  const int64_t h = samples.rows, w = samples.cols, m = model.size_multiple(), min_size = model.min_size();
  const int64_t ph = tur::round_up(std::max(h, min_size), m), pw = tur::round_up(std::max(w, min_size), m);
  auto index_map = [](int64_t size, int64_t padded) {
    auto t = tur::reflect_index(size, padded, torch::kCPU).contiguous();
    return std::vector<int64_t>(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + padded);
  };
  const std::vector<int64_t> rows = index_map(h, ph), cols = index_map(w, pw);
  const auto ys = tur::tile_starts(ph, tile, overlap), xs = tur::tile_starts(pw, tile, overlap);
  const int64_t th = std::min(tile, ph), tw = std::min(tile, pw);
  auto wy = tur::blend_weights(th, overlap, ys.size()).to(device);
  auto wx = tur::blend_weights(tw, overlap, xs.size()).to(device);
  auto weight = wy.unsqueeze(1) * wx.unsqueeze(0);
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat).device(device);
  torch::Tensor acc;  // (1, C, th, pw), allocated at the first tile (C: the model's output channels)
  auto wsum = torch::zeros({th, pw}, f32);
  cv::Mat out(static_cast<int>(h), static_cast<int>(w), sixteen_bit ? CV_16UC3 : CV_8UC3);
  for (size_t k = 0; k < ys.size(); ++k) {
    const int64_t y0 = ys[k];
    for (int64_t x0 : xs) {
      auto x = model.to_model(samples_to_rgb(gather_tile(samples, rows, cols, y0, x0, th, tw)).to(device, torch::kFloat));
      auto y = model(x).to(torch::kFloat);
      if (!acc.defined()) acc = torch::zeros({y.size(0), y.size(1), th, pw}, f32);
      acc.narrow(-2, 0, th).narrow(-1, x0, tw).add_(y * weight);
      wsum.narrow(-1, x0, tw).add_(weight);
    }
    // Rows [y0, next band's start) are final.
    const int64_t done = (k + 1 < ys.size() ? ys[k + 1] : y0 + th) - y0;
    const int64_t n = std::min(done, h - y0);
    if (n > 0) {
      auto band = acc.narrow(-2, 0, n).narrow(-1, 0, w) / wsum.narrow(0, 0, n).narrow(1, 0, w);
      if (!torch::isfinite(band).all().item<bool>()) fail_non_finite(model_path, input_path);
      to_file_pixels(model.from_model(band), sixteen_bit).copyTo(out.rowRange(static_cast<int>(y0),
                                                                              static_cast<int>(y0 + n)));
    }
    const int64_t keep = th - done;
    if (keep > 0) {
      acc.narrow(-2, 0, keep).copy_(acc.narrow(-2, done, keep).clone());
      wsum.narrow(0, 0, keep).copy_(wsum.narrow(0, done, keep).clone());
    }
    acc.narrow(-2, keep, th - keep).zero_();
    wsum.narrow(0, keep, th - keep).zero_();
  }
  return out;
}

// Peak resident memory of this process (VmHWM; unlike getrusage it does not count the parent's pages before exec).
double peak_rss_mib() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;  // reported in kB
  return -1.0;
}

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

int run(int argc, char** argv) {
  // A short-lived process that allocates and frees the same large activations for every run and tile: keep freed
  // memory in the heap for reuse instead of unmapping it (on CPU every fresh mapping costs a page fault per 4 KiB on
  // first touch: 2-3x the time of a 1024x1024 restoration). The price is heap fragmentation: the peak resident
  // memory of a whole 1024x1024 image grows (TorchScript about 1.0 -> 2.1 GiB, AOTInductor 0.65 -> 0.9 GiB with
  // nafnet-tiny); tiling bounds it (about 0.35 GiB). Memory goes back to the OS at exit.
  mallopt(M_MMAP_MAX, 0);
  mallopt(M_TRIM_THRESHOLD, -1);
  const Options opt = parse_args(argc, argv);
  const torch::Device device = parse_device(opt.device);
  c10::InferenceMode guard;

  if (same_file(opt.input, opt.output))
    fail(kUsageError, "--output: " + in_quotes(opt.output) + " is the input file; choose another path");
  Image image = read_image(opt.input);
  check_output(opt.output);
  Metadata meta = inspect_model(opt.model);
  std::optional<std::pair<int64_t, int64_t>> tiling;
  try {
    tiling = tur::resolve_tiling(opt.tile, opt.overlap, meta.size_multiple, meta.min_size);
  } catch (const tur::TilingError& e) {
    fail(kUsageError, e.option + ": " + e.what());
  }
  const torch::ScalarType dtype = resolve_dtype(meta, device, opt.half, opt.model);
  const int64_t height = image.samples.rows, width = image.samples.cols;
  if (meta.max_side > 0) {  // what the model will see: the padded image, or a tile of it
    const int64_t m = meta.size_multiple;
    const int64_t side = std::max(tur::round_up(std::max(height, meta.min_size), m),
                                  tur::round_up(std::max(width, meta.min_size), m));
    const int64_t fed = tiling ? std::min(tiling->first, side) : side;
    if (fed > meta.max_side)
      fail(kUsageError, std::string(tiling ? "--tile" : "--input") + ": " + in_quotes(opt.model) +
                            " accepts sides up to " + std::to_string(meta.max_side) + " pixels; use --tile " +
                            std::to_string(meta.max_side / m * m) + " or smaller");
  }
  const bool sixteen = image.sixteen_bit && holds_sixteen_bit(opt.output);

  auto t0 = std::chrono::steady_clock::now();
  Model model(opt.model, meta, device, dtype);
  const double load_ms = ms_since(t0);

  // A decompression bomb under the pixel limit, or a big image restored whole: an allocation fails somewhere in
  // the conversion or the model. Say which image and what to do rather than the allocator's words.
  auto out_of_memory = [&]() {
    fail(kFailed, "--input " + in_quotes(opt.input) + ": not enough memory to restore its " +
                      std::to_string(width) + "x" + std::to_string(height) + " pixels" +
                      (tiling ? "; use a smaller --tile" : " whole; use --tile 512 (memory then grows with the tile)"));
  };
  auto is_allocation_failure = [](const std::string& what) {
    return what.find("can't allocate memory") != std::string::npos ||
           what.find("out of memory") != std::string::npos || what.find("Insufficient memory") != std::string::npos;
  };

  // Whole image: the float image, converted once. Tiled: the decoded samples only (restore_tiled).
  torch::Tensor rgb;
  try {
    if (!tiling) rgb = samples_to_rgb(image.samples);
  } catch (const std::bad_alloc&) {
    out_of_memory();
  } catch (const c10::Error& e) {
    if (is_allocation_failure(e.what_without_backtrace())) out_of_memory();
    throw;
  }
  auto restore_once = [&]() -> cv::Mat {
    if (tiling)
      return restore_tiled(model, image.samples, device, tiling->first, tiling->second, sixteen, opt.model,
                           opt.input);
    return to_file_pixels(restore_whole(model, rgb, device, opt.model, opt.input), sixteen);
  };
  cv::Mat pixels;
  try {
    t0 = std::chrono::steady_clock::now();
    pixels = restore_once();
    if (device.is_cuda()) torch::cuda::synchronize();
    const double first_ms = ms_since(t0);
    if (opt.benchmark > 0) {
      std::vector<double> times;
      for (int64_t i = 0; i < opt.benchmark; ++i) {
        t0 = std::chrono::steady_clock::now();
        pixels = restore_once();
        if (device.is_cuda()) torch::cuda::synchronize();
        times.push_back(ms_since(t0));
      }
      std::sort(times.begin(), times.end());
      std::fprintf(stderr,
                   "tur-restore: timing load_ms=%.3f first_ms=%.3f median_ms=%.3f min_ms=%.3f runs=%lld "
                   "peak_rss_mib=%.1f\n",
                   load_ms, first_ms, times[times.size() / 2], times.front(), static_cast<long long>(times.size()),
                   peak_rss_mib());
    }
  } catch (const std::bad_alloc&) {
    out_of_memory();
  } catch (const c10::Error& e) {
    if (is_allocation_failure(e.what_without_backtrace())) out_of_memory();
    fail(kFailed, "inference failed: " + first_line(e.what_without_backtrace()));
  } catch (const cv::Exception& e) {
    if (e.code == cv::Error::StsNoMem) out_of_memory();
    throw;
  }
  const int in_channels = image.samples.channels();
  if (in_channels == 2 || in_channels == 4) {
    if (holds_alpha(opt.output))
      pixels = with_alpha(pixels, image.samples);
    else
      std::cerr << "tur-restore: note: " << opt.input << " has an alpha channel, which "
                << fs::path(opt.output).extension().string() << " files cannot hold; written without it (use .png "
                << "to keep it)\n";
  }
  write_image(opt.output, pixels);
  std::cout << "tur-restore: wrote " << opt.output << " (" << pixels.rows << "x" << pixels.cols << ", "
            << (sixteen ? 16 : 8) << "-bit)\n";
  return kOk;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const RunnerError& e) {
    std::cerr << "tur-restore: error: " << e.message << "\n";
    return e.code;
  } catch (const c10::Error& e) {
    std::cerr << "tur-restore: error: " << first_line(e.what_without_backtrace()) << "\n";
    return kFailed;
  } catch (const cv::Exception& e) {
    std::cerr << "tur-restore: error: " << first_line(e.what()) << "\n";
    return kFailed;
  } catch (const std::exception& e) {
    std::cerr << "tur-restore: error: " << first_line(e.what()) << "\n";
    return kFailed;
  }
}
