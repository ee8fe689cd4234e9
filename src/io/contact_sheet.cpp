// Contact sheets with a metadata map: a thin front for the grid writer in video_common.cpp,
// which already owns the layout, the PNG encoding and the atomic, no-overwrite output; this file
// only turns the generation-settings map into the PNG text chunk the other writers produce.
#include "vdit/io/contact_sheet.h"

#include "vdit/common.h"
#include "vdit/io/video_io.h"

namespace vdit {

void write_contact_sheet(const at::Tensor& video, const std::string& path,
                         const std::map<std::string, std::string>& metadata, int columns, bool overwrite) {
  if (columns < 0) throw InputError("contact sheet columns must be >= 0 (0: automatic), got " + std::to_string(columns));
  TextChunks text;
  if (auto it = metadata.find("parameters"); it != metadata.end()) text.emplace_back("parameters", it->second);
  else if (!metadata.empty()) text.emplace_back("parameters", metadata_comment(metadata));
  write_contact_sheet(path, video, columns, text, overwrite, /*gap=*/2);
}

}  // namespace vdit
