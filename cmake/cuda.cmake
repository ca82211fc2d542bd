# CUDA is optional: kernels build only with a CUDA torch and nvcc (MEMOPT_ENABLE_CUDA).
# The .cu files include only CUDA headers and kernel_params.h, and the *_glue.cpp files that
# register them for the CUDA dispatch key include only ATen, so both can be compile-checked on a
# CPU-only machine with nvcc and a CPU torch wheel (MEMOPT_CUDA_COMPILE_ONLY; tests/test_cuda_build.py
# does the same check without CMake).
option(MEMOPT_CUDA_COMPILE_ONLY "Compile-check the CUDA kernels and glue without a CUDA torch" OFF)
file(GLOB MEMOPT_CUDA_SOURCES CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/cpp/src/cuda/*.cu)
file(GLOB MEMOPT_CUDA_GLUE CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/cpp/src/cuda/*_glue.cpp)
if(MEMOPT_CUDA_SOURCES AND (MEMOPT_CUDA_COMPILE_ONLY OR (MEMOPT_ENABLE_CUDA AND TORCH_CUDA_LIBRARIES)))
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES 80-real 90)  # A100 and H100 SASS, plus PTX for newer GPUs
  endif()
  enable_language(CUDA)
  set(CMAKE_CUDA_STANDARD 17)
  add_library(memopt_cuda_kernels OBJECT ${MEMOPT_CUDA_SOURCES})
  target_include_directories(memopt_cuda_kernels PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/cpp/include)
  set_target_properties(memopt_cuda_kernels PROPERTIES POSITION_INDEPENDENT_CODE ON)
  if(MEMOPT_CUDA_COMPILE_ONLY)
    add_library(memopt_cuda_glue_check OBJECT ${MEMOPT_CUDA_GLUE})
    target_link_libraries(memopt_cuda_glue_check PRIVATE ${TORCH_LIBRARIES})
    target_include_directories(memopt_cuda_glue_check PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/cpp/include)
  else()
    target_sources(memopt PRIVATE $<TARGET_OBJECTS:memopt_cuda_kernels> ${MEMOPT_CUDA_GLUE})
    find_package(CUDAToolkit REQUIRED)
    target_link_libraries(memopt PUBLIC CUDA::cudart)
    target_compile_definitions(memopt PUBLIC MEMOPT_WITH_CUDA=1)
  endif()
endif()
