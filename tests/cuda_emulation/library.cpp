// The op library ``structtoken_emulated`` (the build defines ``structtoken`` as ``structtoken_emulated``): the
// schemas of csrc/schemas.h, implemented for the CPU by csrc/cuda/ compiled against the emulator (__init__.py).
#include "schemas.h"

TORCH_LIBRARY(structtoken, m) { structtoken::define_ops(m); }
