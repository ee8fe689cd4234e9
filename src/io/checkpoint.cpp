// WeightFile: one interface over safetensors (single or sharded) and torch.save zip archives.
#include "vdit/io/checkpoint.h"

#include "vdit/common.h"
#include "vdit/io/input_file.h"
#include "vdit/io/safetensors.h"

#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/import_read.h>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>

namespace vdit {

namespace fs = std::filesystem;

namespace {

std::string read_prefix(const std::string& path, std::size_t n) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError(path + ": cannot open (missing or unreadable)");
  std::string buf(n, '\0');
  in.read(buf.data(), static_cast<std::streamsize>(n));
  buf.resize(static_cast<std::size_t>(in.gcount()));
  return buf;
}

// The unpickled object of a torch.save checkpoint is a dict of name -> tensor, possibly nested
// under a "state_dict" / "model" / "module" key; flatten nested dicts with dotted names.
void collect_tensors(const c10::IValue& value, const std::string& prefix, std::vector<std::pair<std::string, at::Tensor>>& out,
                     const std::string& path) {
  if (value.isTensor()) {
    out.emplace_back(prefix, value.toTensor());
    return;
  }
  if (value.isGenericDict()) {
    for (const auto& item : value.toGenericDict()) {
      if (!item.key().isString()) throw InputError(path + ": checkpoint dictionary has a non-string key");
      std::string name = item.key().toStringRef();
      collect_tensors(item.value(), prefix.empty() ? name : prefix + "." + name, out, path);
    }
    return;
  }
  // Non-tensor entries (an epoch counter, a config string) carry no weights.
}

}  // namespace

std::shared_ptr<WeightFile> WeightFile::open(const std::string& path) {
  check_input_path(path, "");

  std::shared_ptr<WeightFile> file(new WeightFile());
  file->path_ = path;
  const std::string head = read_prefix(path, 8);

  if (head.size() >= 4 && head.compare(0, 4, "PK\x03\x04", 4) == 0) {
    // torch.save zip archive (.pth). Tensors are read once into memory.
    file->format_ = "pth";
    c10::IValue root;
    try {
      caffe2::serialize::PyTorchStreamReader reader(path);
      root = torch::jit::readArchiveAndTensors("data", "", "", c10::nullopt, c10::nullopt, at::Device(at::kCPU), reader);
    } catch (const c10::Error& e) {
      std::string what = e.what_without_backtrace();
      throw InputError(path + ": cannot read torch checkpoint: " + what.substr(0, what.find('\n')));
    } catch (const std::exception& e) {
      std::string what = e.what();
      throw InputError(path + ": cannot read torch checkpoint: " + what.substr(0, what.find('\n')));
    }
    std::vector<std::pair<std::string, at::Tensor>> tensors;
    collect_tensors(root, "", tensors, path);
    if (tensors.empty()) throw InputError(path + ": torch checkpoint holds no tensors");
    for (auto& [name, tensor] : tensors) {
      TensorMeta meta;
      meta.dtype = st_dtype_name(st_dtype_from_scalar(tensor.scalar_type()));
      meta.shape = tensor.sizes().vec();
      file->keys_.push_back(name);
      file->meta_[name] = meta;
      file->loaded_[name] = tensor;
    }
    return file;
  }
  if (head.size() >= 2 && head[0] == '\x80' && (head[1] == '\x02' || head[1] == '\x04' || head[1] == '\x05')) {
    throw InputError(path + ": legacy (non-zip) torch.save format is not supported; re-save it with torch.save's default zip format");
  }

  auto add_shard = [&](const std::shared_ptr<SafetensorsFile>& shard, const std::string& only_key) {
    for (const auto& e : shard->entries()) {
      if (!only_key.empty() && e.name != only_key) continue;
      if (file->meta_.count(e.name)) throw InputError(path + ": tensor '" + e.name + "' appears in two shards");
      file->keys_.push_back(e.name);
      file->meta_[e.name] = TensorMeta{st_dtype_name(e.dtype), e.shape};
      file->shard_of_[e.name] = shard;
    }
  };

  const bool looks_json = !head.empty() && (head[0] == '{' || head[0] == ' ' || head[0] == '\n');
  if (looks_json || (path.size() >= 5 && path.compare(path.size() - 5, 5, ".json") == 0)) {
    // Sharded checkpoint index: {"metadata": {...}, "weight_map": {tensor: shard file}}.
    file->format_ = "safetensors-sharded";
    std::ifstream in(path);
    nlohmann::json index = nlohmann::json::parse(in, nullptr, false);
    if (index.is_discarded() || !index.is_object()) throw InputError(path + ": index is not valid JSON");
    auto map_it = index.find("weight_map");
    if (map_it == index.end() || !map_it->is_object()) throw InputError(path + ": index has no 'weight_map' object");
    const fs::path dir = fs::path(path).parent_path();
    std::map<std::string, std::shared_ptr<SafetensorsFile>> shards;
    std::map<std::string, std::vector<std::string>> keys_per_shard;
    for (auto it = map_it->begin(); it != map_it->end(); ++it) {
      if (!it.value().is_string()) throw InputError(path + ": weight_map entry '" + it.key() + "' is not a file name");
      keys_per_shard[it.value().get<std::string>()].push_back(it.key());
    }
    for (const auto& [shard_name, keys] : keys_per_shard) {
      auto shard = SafetensorsFile::open((dir / shard_name).string());
      for (const auto& key : keys) {
        if (!shard->find(key)) throw InputError(path + ": tensor '" + key + "' is not in shard " + shard_name);
        add_shard(shard, key);
      }
      for (const auto& [k, v] : shard->metadata()) file->metadata_[k] = v;
    }
    return file;
  }

  file->format_ = "safetensors";
  auto st = SafetensorsFile::open(path);
  add_shard(st, "");
  file->metadata_ = st->metadata();
  return file;
}

const TensorMeta& WeightFile::meta(const std::string& key) const {
  auto it = meta_.find(key);
  if (it == meta_.end()) throw InputError(path_ + ": no tensor named '" + key + "'");
  return it->second;
}

at::Tensor WeightFile::load(const std::string& key) const {
  if (auto it = loaded_.find(key); it != loaded_.end()) return it->second;
  auto it = shard_of_.find(key);
  if (it == shard_of_.end()) throw InputError(path_ + ": no tensor named '" + key + "'");
  return it->second->tensor(key);
}

std::int64_t WeightFile::parameter_count() const {
  std::int64_t n = 0;
  for (const auto& [key, meta] : meta_) {
    std::int64_t e = 1;
    for (auto d : meta.shape) e *= d;
    n += e;
  }
  return n;
}

}  // namespace vdit
