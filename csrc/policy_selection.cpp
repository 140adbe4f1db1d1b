// policy_selection on CPU tensors.
#include "policy_selection.h"
