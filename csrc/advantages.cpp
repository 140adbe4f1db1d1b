// advantages on CPU tensors.
#include "advantages.h"
