"""Float64 oracles: the executable specification of every op, one module per family.

Each function has the public function's signature and is written straight from the formula, in
float64, with no attention to speed or memory.  Tests compare every backend against them.
"""
