// Run-time ISA dispatch of CPU loops (as ATen does, without -march=native in a
// wheel): TCM_CLONES on a non-template function makes GCC emit an AVX-512
// (x86-64-v4), an AVX2 and a baseline x86-64 version and pick one at load time
// through an ifunc resolver. Templates and inline helpers called from such a
// function are inlined into each clone and compiled for its ISA, so a template
// kernel gets clones through a thin non-template entry point per type.
//
// The clones give the same bits: vector and scalar IEEE +, -, *, / round
// identically, and -ffp-contract=off (setup.py) keeps FMA contraction out; the
// loops that use this vectorise across independent lanes, never by reassociating
// one sum.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11  // x86-64-v4: GCC 11+
#define TCM_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TCM_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TCM_CLONES
#endif

// For the helpers a cloned entry point calls: forced inlining puts them inside each
// clone (an out-of-line copy would be compiled for the baseline ISA only).
#if defined(__GNUC__)
#define TCM_CLONE_INLINE inline __attribute__((always_inline))
#else
#define TCM_CLONE_INLINE inline
#endif
