# CUDA is optional: kernels build only with a CUDA torch and nvcc (MEMOPT_ENABLE_CUDA).
# The .cu files include only CUDA headers and kernel_params.h, so they can also be
# compile-checked by nvcc alone on a CPU-only machine (MEMOPT_CUDA_COMPILE_ONLY).
option(MEMOPT_CUDA_COMPILE_ONLY "Compile-check the .cu files with nvcc, without a CUDA torch" OFF)
file(GLOB MEMOPT_CUDA_SOURCES CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/cpp/src/cuda/*.cu)
if(MEMOPT_CUDA_SOURCES AND (MEMOPT_CUDA_COMPILE_ONLY OR (MEMOPT_ENABLE_CUDA AND TORCH_CUDA_LIBRARIES)))
  enable_language(CUDA)
  add_library(memopt_cuda_kernels OBJECT ${MEMOPT_CUDA_SOURCES})
  target_include_directories(memopt_cuda_kernels PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/cpp/include)
  if(NOT MEMOPT_CUDA_COMPILE_ONLY)
    target_sources(memopt PRIVATE $<TARGET_OBJECTS:memopt_cuda_kernels>)
    target_compile_definitions(memopt PUBLIC MEMOPT_WITH_CUDA=1)
  endif()
endif()
