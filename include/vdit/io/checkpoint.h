// Any weights file vdit reads, behind one interface: a single .safetensors file, a sharded
// checkpoint (*.safetensors.index.json), or a torch.save zip (.pth / .pt / .bin).
#pragma once

#include <ATen/ATen.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace vdit {

class SafetensorsFile;

struct TensorMeta {
  std::string dtype;                 // stored dtype name, safetensors spelling ("BF16", "F8_E4M3")
  std::vector<std::int64_t> shape;
};

class WeightFile {
 public:
  // Opens by content: safetensors, a safetensors index JSON, or a torch zip pickle. Throws
  // InputError (one line naming the file) for a missing, unreadable or corrupt file.
  static std::shared_ptr<WeightFile> open(const std::string& path);

  const std::string& path() const { return path_; }
  const std::string& format() const { return format_; }  // "safetensors" | "safetensors-sharded" | "pth"
  const std::vector<std::string>& keys() const { return keys_; }  // stored order
  bool has(const std::string& key) const { return meta_.count(key) != 0; }
  const TensorMeta& meta(const std::string& key) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // The tensor as stored (fp8 -> f32 exactly), on the CPU. Throws InputError for an unknown key.
  at::Tensor load(const std::string& key) const;
  // Total element count over all tensors.
  std::int64_t parameter_count() const;

 private:
  WeightFile() = default;
  std::string path_;
  std::string format_;
  std::vector<std::string> keys_;
  std::map<std::string, TensorMeta> meta_;
  std::map<std::string, std::string> metadata_;
  std::map<std::string, std::shared_ptr<SafetensorsFile>> shard_of_;  // safetensors formats
  std::map<std::string, at::Tensor> loaded_;                          // pth: unpickled up front
};

}  // namespace vdit
