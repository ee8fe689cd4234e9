// FFmpeg encoding/decoding (libavformat, libavcodec, libswscale). Only built with
// VDIT_WITH_FFMPEG; the format dispatch in video_common.cpp calls in here.
#include "vdit/io/video_io.h"

#include "vdit/common.h"
#include "vdit/io/output_file.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

extern "C" {
#include <libavcodec/avcodec.h>
#include <libavformat/avformat.h>
#include <libavutil/dict.h>
#include <libavutil/imgutils.h>
#include <libavutil/opt.h>
#include <libswscale/swscale.h>
}

namespace vdit {
namespace detail {
namespace {

// ---- RAII for the FFmpeg objects (their free functions take a pointer to the pointer) --------
struct CodecContextFree {
  void operator()(AVCodecContext* c) const { avcodec_free_context(&c); }
};
struct FrameFree {
  void operator()(AVFrame* f) const { av_frame_free(&f); }
};
struct PacketFree {
  void operator()(AVPacket* p) const { av_packet_free(&p); }
};
struct SwsFree {
  void operator()(SwsContext* s) const { sws_freeContext(s); }
};
struct InputFree {
  void operator()(AVFormatContext* f) const { avformat_close_input(&f); }
};
struct OutputFree {
  void operator()(AVFormatContext* f) const {
    if (f->pb && !(f->oformat->flags & AVFMT_NOFILE)) avio_closep(&f->pb);
    avformat_free_context(f);
  }
};
using CodecContextPtr = std::unique_ptr<AVCodecContext, CodecContextFree>;
using FramePtr = std::unique_ptr<AVFrame, FrameFree>;
using PacketPtr = std::unique_ptr<AVPacket, PacketFree>;
using InputPtr = std::unique_ptr<AVFormatContext, InputFree>;
using OutputPtr = std::unique_ptr<AVFormatContext, OutputFree>;

std::string av_error_text(int code) {
  char buffer[AV_ERROR_MAX_STRING_SIZE] = {0};
  av_strerror(code, buffer, sizeof(buffer));
  return buffer;
}

// FFmpeg's own chatter (x264 statistics...) only with -v; its errors always.
void configure_ffmpeg_logging() { av_log_set_level(log_level() == LogLevel::Verbose ? AV_LOG_INFO : AV_LOG_ERROR); }

// FFmpeg treats "proto:rest" as a URL; "file:" makes any local path a plain file.
std::string file_url(const std::string& path) { return "file:" + path; }

struct FormatSpec {
  const char* muxer;
  std::vector<const char*> encoders;  // preferred first
};

const FormatSpec& format_spec(const std::string& format) {
  static const std::vector<const char*> h264{"libx264", "libopenh264", "mpeg4"};
  static const std::map<std::string, FormatSpec> specs{
      {"mp4", {"mp4", h264}},
      {"mov", {"mov", h264}},
      {"mkv", {"matroska", h264}},
      {"webm", {"webm", {"libvpx-vp9", "libvpx"}}},
      {"webp", {"webp", {"libwebp_anim", "libwebp"}}},
      {"gif", {"gif", {"gif"}}},
  };
  auto it = specs.find(format);
  if (it == specs.end()) throw InputError("no FFmpeg format '" + format + "'");
  return it->second;
}

bool codec_supports(const AVCodec* codec, AVPixelFormat format) {
  if (!codec->pix_fmts) return true;
  for (const AVPixelFormat* p = codec->pix_fmts; *p != AV_PIX_FMT_NONE; ++p)
    if (*p == format) return true;
  return false;
}

AVPixelFormat encoder_pixel_format(const AVCodec* codec) {
  if (codec->id == AV_CODEC_ID_GIF) return AV_PIX_FMT_PAL8;
  // libwebp converts RGB itself (no 4:2:0 even-size constraint on our side).
  if (codec->id == AV_CODEC_ID_WEBP && codec_supports(codec, AV_PIX_FMT_RGB32)) return AV_PIX_FMT_RGB32;
  if (codec_supports(codec, AV_PIX_FMT_YUV420P)) return AV_PIX_FMT_YUV420P;
  return codec->pix_fmts ? codec->pix_fmts[0] : AV_PIX_FMT_YUV420P;
}

// H.264/MPEG-4 in 4:2:0 reject odd sizes; VP8/VP9 handle them.
bool needs_even_size(const AVCodec* codec, AVPixelFormat format) {
  const AVPixFmtDescriptor* d = av_pix_fmt_desc_get(format);
  const bool subsampled = d && (d->log2_chroma_w > 0 || d->log2_chroma_h > 0);
  return subsampled && codec->id != AV_CODEC_ID_VP9 && codec->id != AV_CODEC_ID_VP8;
}

// Pads [F,H,W,3] to even H and W by repeating the last row/column.
at::Tensor pad_to_even(const at::Tensor& rgb8) {
  at::Tensor x = rgb8;
  if (x.size(1) % 2) x = at::cat({x, x.narrow(1, x.size(1) - 1, 1)}, 1);
  if (x.size(2) % 2) x = at::cat({x, x.narrow(2, x.size(2) - 1, 1)}, 2);
  return x.contiguous();
}

// GIF needs 8-bit palette frames: a fixed 6x7x6 colour cube (252 colours) with 4x4 ordered
// dithering. Computed with tensor ops; returns [F,H,W] uint8 indices and fills the palette.
at::Tensor gif_palette_indices(const at::Tensor& rgb8, uint32_t palette[256]) {
  const int64_t levels[3] = {6, 7, 6};
  for (int r = 0; r < 6; ++r)
    for (int g = 0; g < 7; ++g)
      for (int b = 0; b < 6; ++b) {
        const uint32_t R = static_cast<uint32_t>(std::lround(r * 255.0 / 5)),
                       G = static_cast<uint32_t>(std::lround(g * 255.0 / 6)),
                       B = static_cast<uint32_t>(std::lround(b * 255.0 / 5));
        palette[r * 42 + g * 6 + b] = 0xFF000000u | (R << 16) | (G << 8) | B;
      }
  for (int i = 252; i < 256; ++i) palette[i] = 0xFF000000u;

  const int64_t h = rgb8.size(1), w = rgb8.size(2);
  const at::Tensor bayer =
      at::tensor({0, 8, 2, 10, 12, 4, 14, 6, 3, 11, 1, 9, 15, 7, 13, 5}, at::kFloat).view({4, 4}).add(0.5).div(16);
  const at::Tensor threshold =
      bayer.repeat({(h + 3) / 4, (w + 3) / 4}).narrow(0, 0, h).narrow(1, 0, w).unsqueeze(-1);  // [H,W,1]
  const at::Tensor steps = at::tensor({levels[0] - 1, levels[1] - 1, levels[2] - 1}, at::kFloat);
  const at::Tensor q = rgb8.to(at::kFloat).div(255).mul(steps).add(threshold).floor();
  const at::Tensor clamped = at::minimum(q.clamp_min(0), steps);
  const at::Tensor weights = at::tensor({42.0f, 6.0f, 1.0f});
  return clamped.mul(weights).sum(-1).to(at::kByte).contiguous();
}

// Sets quality options on an encoder context before opening it.
void configure_encoder(AVCodecContext* ctx, const AVCodec* codec, const VideoWriteOptions& options,
                       AVDictionary** codec_options) {
  const std::string name = codec->name;
  const int crf = options.crf;
  if (name == "libx264") {
    av_dict_set(codec_options, "crf", std::to_string(crf).c_str(), 0);
    av_dict_set(codec_options, "preset", "medium", 0);
  } else if (name == "libvpx-vp9") {
    // Constant quality: crf with a zero target bitrate.
    ctx->bit_rate = 0;
    av_dict_set(codec_options, "crf", std::to_string(crf).c_str(), 0);
    av_dict_set(codec_options, "row-mt", "1", 0);
    av_dict_set(codec_options, "deadline", "good", 0);
    av_dict_set(codec_options, "cpu-used", "4", 0);
  } else if (name == "libvpx") {
    // VP8 constrained quality needs a bitrate ceiling; make it generous.
    ctx->bit_rate = static_cast<int64_t>(ctx->width) * ctx->height * std::max(1.0, options.fps) * 2;
    av_dict_set(codec_options, "crf", std::to_string(std::clamp(crf, 4, 63)).c_str(), 0);
  } else if (name == "libwebp_anim" || name == "libwebp") {
    if (crf == 0) {
      av_dict_set(codec_options, "lossless", "1", 0);
    } else {
      av_dict_set(codec_options, "lossless", "0", 0);
      av_dict_set(codec_options, "quality", std::to_string(std::max(0.0, 100.0 - crf / 2.0)).c_str(), 0);
    }
  } else if (codec->id == AV_CODEC_ID_MPEG4) {
    // Fixed quantiser, roughly matched to the x264 crf scale (crf 18 -> q 3).
    ctx->flags |= AV_CODEC_FLAG_QSCALE;
    ctx->global_quality = FF_QP2LAMBDA * std::clamp(static_cast<int>(std::lround(crf / 6.0)), 1, 31);
  } else if (codec->id == AV_CODEC_ID_H264) {
    // Other H.264 encoders (openh264...): a bitrate that keeps crf-18-like quality.
    ctx->bit_rate = static_cast<int64_t>(ctx->width * static_cast<double>(ctx->height) * options.fps * 0.3);
  }
}

struct OpenedEncoder {
  CodecContextPtr ctx;
  const AVCodec* codec = nullptr;
  AVPixelFormat pixel_format = AV_PIX_FMT_NONE;
};

// Tries the format's encoders in order of preference and returns the first that opens.
OpenedEncoder open_encoder(const std::string& format, const FormatSpec& spec, const AVOutputFormat* muxer,
                           int64_t width, int64_t height, const VideoWriteOptions& options, const std::string& path) {
  const AVRational fps_q = av_d2q(options.fps, 1001000);
  std::string failures;
  for (const char* encoder_name : spec.encoders) {
    const AVCodec* codec = avcodec_find_encoder_by_name(encoder_name);
    if (!codec) {
      failures += std::string(failures.empty() ? "" : "; ") + encoder_name + ": not in this FFmpeg";
      continue;
    }
    OpenedEncoder encoder;
    encoder.codec = codec;
    encoder.pixel_format = encoder_pixel_format(codec);
    encoder.ctx.reset(avcodec_alloc_context3(codec));
    if (!encoder.ctx) throw RuntimeError("out of memory allocating an encoder");
    AVCodecContext* ctx = encoder.ctx.get();
    const bool pad = needs_even_size(codec, encoder.pixel_format);
    ctx->width = static_cast<int>(pad ? (width + 1) / 2 * 2 : width);
    ctx->height = static_cast<int>(pad ? (height + 1) / 2 * 2 : height);
    ctx->pix_fmt = encoder.pixel_format;
    ctx->time_base = av_inv_q(fps_q);
    ctx->framerate = fps_q;
    ctx->sample_aspect_ratio = AVRational{1, 1};
    ctx->thread_count = std::max(1, at::get_num_threads());
    const AVPixFmtDescriptor* d = av_pix_fmt_desc_get(encoder.pixel_format);
    if (d && !(d->flags & (AV_PIX_FMT_FLAG_RGB | AV_PIX_FMT_FLAG_PAL))) {
      // We convert with BT.709 limited-range coefficients; say so in the stream.
      ctx->color_range = AVCOL_RANGE_MPEG;
      ctx->colorspace = AVCOL_SPC_BT709;
      ctx->color_primaries = AVCOL_PRI_BT709;
      ctx->color_trc = AVCOL_TRC_BT709;
    }
    if (muxer->flags & AVFMT_GLOBALHEADER) ctx->flags |= AV_CODEC_FLAG_GLOBAL_HEADER;
    AVDictionary* codec_options = nullptr;
    configure_encoder(ctx, codec, options, &codec_options);
    const int rc = avcodec_open2(ctx, codec, &codec_options);
    av_dict_free(&codec_options);
    if (rc >= 0) {
      if (encoder_name != spec.encoders.front())
        log_warning(std::string(spec.encoders.front()) + " is not available (" + failures + "); writing " + format +
                    " with " + encoder_name);
      if (ctx->width != width || ctx->height != height)
        log_warning("'" + path + "': " + encoder_name + " needs even sizes; padded " + std::to_string(width) + "x" +
                    std::to_string(height) + " to " + std::to_string(ctx->width) + "x" + std::to_string(ctx->height) +
                    " by repeating the last row/column");
      return encoder;
    }
    failures += std::string(failures.empty() ? "" : "; ") + encoder_name + ": " + av_error_text(rc);
  }
  throw RuntimeError("cannot write '" + path + "': no usable " + format + " encoder (" + failures + ")");
}

}  // namespace

std::string ffmpeg_encoder_for(const std::string& format) {
  const FormatSpec* spec = nullptr;
  try {
    spec = &format_spec(format);
  } catch (const InputError&) {
    return "";
  }
  for (const char* name : spec->encoders)
    if (avcodec_find_encoder_by_name(name)) return name;
  return "";
}

void ffmpeg_write_video(const std::string& path, const std::string& format, const at::Tensor& rgb8_in,
                        const VideoWriteOptions& options) {
  configure_ffmpeg_logging();
  const FormatSpec& spec = format_spec(format);
  AtomicOutput out(path, options.overwrite);

  AVFormatContext* raw_output = nullptr;
  int rc = avformat_alloc_output_context2(&raw_output, nullptr, spec.muxer, file_url(out.temp_path()).c_str());
  if (rc < 0 || !raw_output) throw RuntimeError("FFmpeg has no " + std::string(spec.muxer) + " muxer: " + av_error_text(rc));
  OutputPtr output(raw_output);

  const int64_t frame_count = rgb8_in.size(0), height = rgb8_in.size(1), width = rgb8_in.size(2);
  OpenedEncoder encoder = open_encoder(format, spec, output->oformat, width, height, options, path);
  AVCodecContext* ctx = encoder.ctx.get();
  const at::Tensor rgb8 = (ctx->width != width || ctx->height != height) ? pad_to_even(rgb8_in) : rgb8_in.contiguous();

  AVStream* stream = avformat_new_stream(output.get(), nullptr);
  if (!stream) throw RuntimeError("out of memory allocating an output stream");
  rc = avcodec_parameters_from_context(stream->codecpar, ctx);
  if (rc < 0) throw RuntimeError("cannot set up the output stream: " + av_error_text(rc));
  stream->time_base = ctx->time_base;
  stream->avg_frame_rate = ctx->framerate;
  stream->r_frame_rate = ctx->framerate;

  // Metadata: one tag per entry, and all of it as JSON in "comment".
  for (const auto& [key, value] : options.metadata) av_dict_set(&output->metadata, key.c_str(), value.c_str(), 0);
  if (!options.metadata.empty() && !options.metadata.count("comment"))
    av_dict_set(&output->metadata, "comment", metadata_comment(options.metadata).c_str(), 0);
  if (!options.metadata.empty() && (format == "gif" || format == "webp"))
    log_verbose("'" + path + "': the " + format + " muxer stores no metadata; generation settings not embedded");

  if (!(output->oformat->flags & AVFMT_NOFILE)) {
    rc = avio_open(&output->pb, file_url(out.temp_path()).c_str(), AVIO_FLAG_WRITE);
    if (rc < 0) throw RuntimeError("cannot open '" + out.temp_path() + "' for writing: " + av_error_text(rc));
  }
  AVDictionary* muxer_options = nullptr;
  if (format == "mp4" || format == "mov") {
    // Custom keys survive only as QuickTime "mdta" tags; faststart moves the index to the front
    // so browsers can start playing before the whole file is loaded.
    av_dict_set(&muxer_options, "movflags", "+use_metadata_tags+faststart", 0);
  } else if (format == "gif" || format == "webp") {
    av_dict_set(&muxer_options, "loop", "0", 0);  // loop forever
  }

  rc = avformat_write_header(output.get(), &muxer_options);
  av_dict_free(&muxer_options);
  if (rc < 0) throw RuntimeError("cannot write the " + format + " header of '" + path + "': " + av_error_text(rc));

  FramePtr frame(av_frame_alloc());
  PacketPtr packet(av_packet_alloc());
  if (!frame || !packet) throw RuntimeError("out of memory allocating FFmpeg frames");
  frame->format = ctx->pix_fmt;
  frame->width = ctx->width;
  frame->height = ctx->height;
  frame->color_range = ctx->color_range;
  frame->colorspace = ctx->colorspace;
  frame->color_primaries = ctx->color_primaries;
  frame->color_trc = ctx->color_trc;
  rc = av_frame_get_buffer(frame.get(), 0);
  if (rc < 0) throw RuntimeError("cannot allocate a video frame: " + av_error_text(rc));

  std::unique_ptr<SwsContext, SwsFree> sws;
  at::Tensor gif_indices;
  uint32_t gif_palette[256];
  if (ctx->pix_fmt == AV_PIX_FMT_PAL8) {
    gif_indices = gif_palette_indices(rgb8, gif_palette);
  } else {
    sws.reset(sws_getContext(ctx->width, ctx->height, AV_PIX_FMT_RGB24, ctx->width, ctx->height, ctx->pix_fmt,
                             SWS_BICUBIC | SWS_ACCURATE_RND | SWS_FULL_CHR_H_INP, nullptr, nullptr, nullptr));
    if (!sws) throw RuntimeError("cannot convert RGB to " + std::string(av_get_pix_fmt_name(ctx->pix_fmt)));
    if (ctx->colorspace == AVCOL_SPC_BT709) {
      sws_setColorspaceDetails(sws.get(), sws_getCoefficients(SWS_CS_DEFAULT), /*srcRange=*/1,
                               sws_getCoefficients(SWS_CS_ITU709), /*dstRange=*/0, 0, 1 << 16, 1 << 16);
    }
  }

  auto drain = [&]() {
    while (true) {
      const int r = avcodec_receive_packet(ctx, packet.get());
      if (r == AVERROR(EAGAIN) || r == AVERROR_EOF) return;
      if (r < 0) throw RuntimeError("encoding '" + path + "' failed: " + av_error_text(r));
      if (packet->duration == 0) packet->duration = 1;  // one frame, in codec time base
      av_packet_rescale_ts(packet.get(), ctx->time_base, stream->time_base);
      packet->stream_index = stream->index;
      const int w = av_interleaved_write_frame(output.get(), packet.get());
      if (w < 0) throw RuntimeError("writing '" + path + "' failed: " + av_error_text(w));
    }
  };

  const uint8_t* base = rgb8.data_ptr<uint8_t>();
  const int64_t frame_bytes = static_cast<int64_t>(ctx->width) * ctx->height * 3;
  for (int64_t f = 0; f < frame_count; ++f) {
    rc = av_frame_make_writable(frame.get());
    if (rc < 0) throw RuntimeError("cannot allocate a video frame: " + av_error_text(rc));
    if (ctx->pix_fmt == AV_PIX_FMT_PAL8) {
      const uint8_t* indices = gif_indices[f].data_ptr<uint8_t>();
      for (int y = 0; y < ctx->height; ++y)
        std::memcpy(frame->data[0] + static_cast<std::ptrdiff_t>(y) * frame->linesize[0], indices + y * ctx->width,
                    static_cast<std::size_t>(ctx->width));
      std::memcpy(frame->data[1], gif_palette, sizeof(gif_palette));
    } else {
      const uint8_t* src[1] = {base + f * frame_bytes};
      const int src_stride[1] = {ctx->width * 3};
      sws_scale(sws.get(), src, src_stride, 0, ctx->height, frame->data, frame->linesize);
    }
    frame->pts = f;
    frame->pkt_duration = 1;
    rc = avcodec_send_frame(ctx, frame.get());
    if (rc < 0) throw RuntimeError("encoding '" + path + "' failed: " + av_error_text(rc));
    drain();
  }
  rc = avcodec_send_frame(ctx, nullptr);
  if (rc < 0 && rc != AVERROR_EOF) throw RuntimeError("encoding '" + path + "' failed: " + av_error_text(rc));
  drain();
  rc = av_write_trailer(output.get());
  if (rc < 0) throw RuntimeError("cannot finish '" + path + "': " + av_error_text(rc));
  if (output->pb && !(output->oformat->flags & AVFMT_NOFILE)) {
    rc = avio_closep(&output->pb);
    if (rc < 0) throw RuntimeError("cannot write '" + path + "': " + av_error_text(rc));
  }
  out.commit();
  log_verbose("wrote " + path + " (" + encoder.codec->name + ", " + std::to_string(frame_count) + " frames)");
}

VideoData ffmpeg_read_video(const std::string& path, int64_t max_frames) {
  configure_ffmpeg_logging();
  AVFormatContext* raw_input = nullptr;
  int rc = avformat_open_input(&raw_input, file_url(path).c_str(), nullptr, nullptr);
  if (rc < 0) throw InputError("cannot read video '" + path + "': " + av_error_text(rc));
  InputPtr input(raw_input);
  rc = avformat_find_stream_info(input.get(), nullptr);
  if (rc < 0) throw InputError("cannot read video '" + path + "': " + av_error_text(rc));
  const AVCodec* codec = nullptr;
  const int stream_index = av_find_best_stream(input.get(), AVMEDIA_TYPE_VIDEO, -1, -1, &codec, 0);
  if (stream_index < 0 || !codec)
    throw InputError("cannot read video '" + path + "': " +
                     (stream_index == AVERROR_DECODER_NOT_FOUND ? "no decoder for its video stream" : "no video stream"));
  AVStream* stream = input->streams[stream_index];

  CodecContextPtr ctx(avcodec_alloc_context3(codec));
  if (!ctx) throw RuntimeError("out of memory allocating a decoder");
  rc = avcodec_parameters_to_context(ctx.get(), stream->codecpar);
  if (rc < 0) throw InputError("cannot read video '" + path + "': " + av_error_text(rc));
  ctx->thread_count = std::max(1, at::get_num_threads());
  rc = avcodec_open2(ctx.get(), codec, nullptr);
  if (rc < 0) throw InputError("cannot decode video '" + path + "' (" + codec->name + "): " + av_error_text(rc));

  VideoData video;
  AVRational rate = stream->avg_frame_rate;
  if (rate.num <= 0 || rate.den <= 0) rate = stream->r_frame_rate;
  if (rate.num <= 0 || rate.den <= 0) rate = av_guess_frame_rate(input.get(), stream, nullptr);
  video.fps = (rate.num > 0 && rate.den > 0) ? av_q2d(rate) : 0.0;

  FramePtr frame(av_frame_alloc());
  PacketPtr packet(av_packet_alloc());
  if (!frame || !packet) throw RuntimeError("out of memory allocating FFmpeg frames");
  SwsContext* sws = nullptr;
  std::unique_ptr<SwsContext, SwsFree> sws_owner;
  std::vector<at::Tensor> frames;
  int width = 0, height = 0;
  int skipped_packets = 0;
  const SwsContext* configured_sws = nullptr;
  int configured_colorspace = -1, configured_range = -1;
  const auto limit_reached = [&] { return max_frames > 0 && static_cast<int64_t>(frames.size()) >= max_frames; };

  auto receive_frames = [&]() {
    while (!limit_reached()) {
      const int r = avcodec_receive_frame(ctx.get(), frame.get());
      if (r == AVERROR(EAGAIN) || r == AVERROR_EOF) return;
      if (r < 0) throw InputError("cannot decode video '" + path + "': " + av_error_text(r));
      if (frames.empty()) {
        width = frame->width;
        height = frame->height;
      }
      // Frames whose size changes mid-stream are scaled to the first frame's size.
      SwsContext* next = sws_getCachedContext(sws, frame->width, frame->height, static_cast<AVPixelFormat>(frame->format),
                                              width, height, AV_PIX_FMT_RGB24,
                                              SWS_BICUBIC | SWS_ACCURATE_RND | SWS_FULL_CHR_H_INT, nullptr, nullptr, nullptr);
      if (!next) {
        sws_owner.release();
        throw InputError("cannot convert the frames of '" + path + "' to RGB");
      }
      if (next != sws) {
        sws_owner.release();
        sws_owner.reset(next);
        sws = next;
      }
      // Decode with the coefficients the stream declares (BT.601 when it declares none).
      const int colorspace = frame->colorspace == AVCOL_SPC_UNSPECIFIED ? SWS_CS_DEFAULT : frame->colorspace;
      const int full_range = frame->color_range == AVCOL_RANGE_JPEG;
      if (sws != configured_sws || colorspace != configured_colorspace || full_range != configured_range) {
        sws_setColorspaceDetails(sws, sws_getCoefficients(colorspace), full_range, sws_getCoefficients(SWS_CS_DEFAULT),
                                 /*dstRange=*/1, 0, 1 << 16, 1 << 16);
        configured_sws = sws;
        configured_colorspace = colorspace;
        configured_range = full_range;
      }
      at::Tensor rgb = at::empty({height, width, 3}, at::kByte);
      uint8_t* dst[1] = {rgb.data_ptr<uint8_t>()};
      const int dst_stride[1] = {width * 3};
      sws_scale(sws, frame->data, frame->linesize, 0, frame->height, dst, dst_stride);
      frames.push_back(std::move(rgb));
      av_frame_unref(frame.get());
    }
  };

  while (!limit_reached() && (rc = av_read_frame(input.get(), packet.get())) >= 0) {
    if (packet->stream_index == stream_index) {
      const int s = avcodec_send_packet(ctx.get(), packet.get());
      if (s < 0 && s != AVERROR(EAGAIN)) ++skipped_packets;  // damaged packet: skip it, as ffmpeg does
    }
    av_packet_unref(packet.get());
    receive_frames();
  }
  if (rc < 0 && rc != AVERROR_EOF && frames.empty())
    throw InputError("cannot read video '" + path + "': " + av_error_text(rc));
  if (!limit_reached()) {
    avcodec_send_packet(ctx.get(), nullptr);
    receive_frames();
  }
  if (skipped_packets > 0) log_warning("'" + path + "': skipped " + std::to_string(skipped_packets) + " damaged packets");
  if (frames.empty()) throw InputError("cannot read video '" + path + "': no decodable frames");
  video.frames = from_rgb8(at::stack(frames, 0));  // [3,F,H,W]
  return video;
}

std::map<std::string, std::string> ffmpeg_read_metadata(const std::string& path) {
  configure_ffmpeg_logging();
  AVFormatContext* raw_input = nullptr;
  int rc = avformat_open_input(&raw_input, file_url(path).c_str(), nullptr, nullptr);
  if (rc < 0) throw InputError("cannot read video '" + path + "': " + av_error_text(rc));
  InputPtr input(raw_input);
  std::map<std::string, std::string> metadata;
  const AVDictionaryEntry* entry = nullptr;
  while ((entry = av_dict_get(input->metadata, "", entry, AV_DICT_IGNORE_SUFFIX)))
    metadata[entry->key] = entry->value;
  return metadata;
}

}  // namespace detail
}  // namespace vdit
