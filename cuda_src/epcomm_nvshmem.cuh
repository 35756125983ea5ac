// NVSHMEM device API for NVRTC.
//
// NVSHMEM's headers (3.4.x) use std::is_integral & co. without including <type_traits>, which
// NVRTC does not provide; CCCL's cuda::std versions are equivalent for device code.
#pragma once
#include <cuda/std/type_traits>
namespace std {
using cuda::std::enable_if;
using cuda::std::is_integral;
using cuda::std::is_same;
using cuda::std::is_signed;
using cuda::std::is_unsigned;
}  // namespace std
#include <nvshmem.h>
#include <nvshmemx.h>
