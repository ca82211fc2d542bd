# The C++ package: `cmake --install` (and the wheel, whose install prefix is the memopt_core
# package directory) lays out lib/libmemopt.so, include/memopt/*.h and
# lib/cmake/memopt_core/, so that a LibTorch trainer does
#   find_package(memopt_core REQUIRED)
#   target_link_libraries(trainer memopt_core::memopt)
include(CMakePackageConfigHelpers)

# In the wheel torch sits two levels up (site-packages/torch/lib); a plain install keeps the
# torch it was built against.
set_target_properties(memopt PROPERTIES INSTALL_RPATH "$ORIGIN/../../torch/lib;${TORCH_LIB_DIR}")
install(TARGETS memopt EXPORT memopt_coreTargets LIBRARY DESTINATION lib)
install(DIRECTORY cpp/include/memopt DESTINATION include FILES_MATCHING PATTERN "*.h")
install(EXPORT memopt_coreTargets NAMESPACE memopt_core:: DESTINATION lib/cmake/memopt_core)
get_filename_component(MEMOPT_BUILD_TORCH_DIR "${Torch_DIR}" ABSOLUTE)
configure_package_config_file(cmake/memopt_coreConfig.cmake.in
  "${CMAKE_CURRENT_BINARY_DIR}/memopt_coreConfig.cmake"
  INSTALL_DESTINATION lib/cmake/memopt_core)
write_basic_package_version_file("${CMAKE_CURRENT_BINARY_DIR}/memopt_coreConfigVersion.cmake"
  VERSION 0.1.0 COMPATIBILITY SameMinorVersion)
install(FILES "${CMAKE_CURRENT_BINARY_DIR}/memopt_coreConfig.cmake"
              "${CMAKE_CURRENT_BINARY_DIR}/memopt_coreConfigVersion.cmake"
        DESTINATION lib/cmake/memopt_core)
