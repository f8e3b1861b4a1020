"""Readable reference implementations of the hand-optimized memory systems.

Each module holds plain step-by-step PyTorch (a loop over time, the maths as in the papers and DESIGN.md)
that runs on the *same* parameters as an optimized module: functions that take the module and its inputs
and compute outputs and next state the slow, obvious way. The equivalence tests compare the optimized
paths against them in float64. Nothing here is registered as a memory system.
"""

# reference.miras: DualTierMiras (step loop, acting step, chunked mode) -- tests/test_miras.py,
#   tests/test_infinity_speed_equivalence.py
# reference.mamba: Mamba's causal conv and selective scan -- tests/test_mamba.py
# reference.armt: ARMT's step and sequence modes -- tests/test_armt.py
# reference.cmrn: CMRN's per-step loop (CMRNReference, same parameters as rlmem.memory.cmrn.CMRN) -- tests/test_cmrn_fast.py
# reference.stm: STM's step loop, Diffuser and HF generator call (STMReference, same parameters as rlmem.memory.stm.STM) -- tests/test_stm_fast.py
# reference.adapter: the adapter memory system's window mode through transformers' forward -- tests/test_adapter_fast.py
