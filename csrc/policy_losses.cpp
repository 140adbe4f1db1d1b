// policy_losses on CPU tensors.
#include "policy_losses.h"
