// natgen CPU kernels: the shared C++ body that every generated CPU instance instantiates. Generated sources
// include this header only; it includes the parts, one job each, in the order they build on each other:
//   natgen_cpu_target.h  compile targets (ISA clones, the fixed-shape kernels' AVX2+FMA build), attributes
//   natgen_cpu_simd.h    vector types, loads / stores, row <-> lane transposes, exp / exp2 / log2, hmax / hsum
//   natgen_cpu_plan.h    Config, the window rule, the work plan (dilation groups, tiles, key unions), the
//                        specialized forward's layout (FixedFwd), per-thread scratch buffers, TileRef
//   natgen_cpu_lanes.h   the lane scheme: lane kernels, a tile's transposed key-union gather, lane groups
//   natgen_cpu_fwd.h     the forward (namespace fwd): per-query kernels and the specialized fixed_tile
//   natgen_cpu_bwd.h     the backward: fixed-shape lane-group kernels (Fixed, fixed_group), backward_tile
//   natgen_cpu_driver.h  work units, the OpenMP loop over them, run_forward / run_backward
//
// A generated instance (templates/cpu_na.cpp.j2) fixes the compile-time facts of its spec (element type,
// kernel size, head_dim, per-dim causal mask, query tile) through `Config` and wraps the per-unit work in a
// function built for several ISAs (target_clones: AVX-512, AVX2+FMA, baseline x86-64), chosen at load time
// from the CPU's features. Everything the kernels read arrives through one `Args` block of 8-byte fields,
// which each generated source defines before including this header (from codegen/abi.py's "cpu" ABI; the
// runtime packs it from the layout the manifest records); the entry point is one extern "C" function named
// after the spec, taking that block and its field count (a count that differs from this build's returns an
// error instead of misreading the block), which ctypes calls with the GIL released.
//
// Work decomposition. Dilation splits every axis into interleaved groups that never see each other, so a
// query tile is a box of group-LOCAL coordinates inside one group combination; its keys are then a dense
// box too (the union of the tile's windows), gathered once per tile into contiguous buffers.
// - Forward (namespace fwd): vectorized over keys. Per query, its window's keys along the last axis come in
//   runs of V ("segments"); scores are FMAs of a broadcast query channel against a segment of transposed
//   keys, P.V broadcast probabilities against row-major value rows. A query computes exactly its own keys,
//   which matters near borders, where windows are clamped. Specialized instances (constant K and head_dim,
//   no causal axis) gather the union at fixed strides instead (FixedFwd, fixed_tile), so every key and
//   value offset from a query's window corner is a compile-time constant, take the softmax in base 2, and
//   work on 2 x 2 query blocks: the scores of the two queries stacked on axis 1 together (each key vector
//   loaded once for both), P.V of the two side by side on the last axis together (each value row loaded
//   once for both). In 2-D their tiles grow up to 4x taller on axis 1 where the problem has units enough for
//   the threads.
// - Backward: vectorized over queries. One vector holds V neighbouring queries along the last axis
//   ("lanes"), whose windows are one box shifted by a key per lane, so the key of lane j at window (row,
//   column) is column + j of a union row: one contiguous vector load per (row, column, channel) from keys and
//   values gathered transposed per union row. S, dP, dS, dQ are element-wise across lanes, and dK/dV are
//   summed per key over the lanes that saw it, so each key row is read and written once per window row. Near
//   borders a group reads a few more columns and masks each lane to its own window. Specialized instances
//   (constant K and head_dim, no causal axis) run their interior lane groups, and the border groups of
//   K2 + K2 / 2 columns, through kernels whose every count and offset is a constant (Fixed, fixed_group).
// The specialized paths of both directions are built once, for AVX2+FMA (NATGEN_FIXED_TARGET), not per clone.
// Extra tokens are the same keys for every query, inside the same softmax. prod(K) is small, so all scores
// of a query are computed first, then one max/exp pass (no online rescaling).
#pragma once

#include "natgen_cpu_target.h"
#include "natgen_cpu_simd.h"
#include "natgen_cpu_plan.h"
#include "natgen_cpu_lanes.h"
#include "natgen_cpu_rpb.h"
#include "natgen_cpu_fwd.h"
#include "natgen_cpu_bwd.h"
#include "natgen_cpu_driver.h"
