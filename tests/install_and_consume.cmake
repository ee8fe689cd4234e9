# CTest `install_and_consume` (label "install"): vdit as another program uses it. Installs this build
# into a fresh prefix, configures and builds examples/ against that prefix alone (find_package(vdit)),
# and generates a 2-step clip with the example on the built-in demo model (models/shapes).
# Run as: cmake -DBUILD_DIR=... -DSOURCE_DIR=... -DWORK_DIR=... [-DLAUNCHER=ccache] -P this file
foreach(var BUILD_DIR SOURCE_DIR WORK_DIR)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "install_and_consume: ${var} is not set")
  endif()
endforeach()

set(prefix "${WORK_DIR}/prefix")
set(example_build "${WORK_DIR}/examples-build")
file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")

function(run step)
  string(TIMESTAMP t0 "%s")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  string(TIMESTAMP t1 "%s")
  math(EXPR seconds "${t1} - ${t0}")
  message(STATUS "install_and_consume: ${step} (${seconds} s)")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "install_and_consume: ${step} failed (${rc}):\n${out}")
  endif()
  set(step_output "${out}" PARENT_SCOPE)
endfunction()

run("cmake --install" "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${prefix}")
foreach(f lib/libvdit.a lib/libvdit_spm.so include/vdit/pipelines/wan_t2v.h lib/cmake/vdit/vdit-config.cmake
          lib/cmake/vdit/vdit-config-version.cmake lib/cmake/vdit/vdit-targets.cmake)
  if(NOT EXISTS "${prefix}/${f}")
    message(FATAL_ERROR "install_and_consume: ${prefix}/${f} was not installed")
  endif()
endforeach()
if(EXISTS "${prefix}/include/vdit/demo")
  message(FATAL_ERROR "install_and_consume: the demo's headers were installed with the runtime library's")
endif()

set(configure_args -S "${SOURCE_DIR}/examples" -B "${example_build}" -DCMAKE_BUILD_TYPE=Release
    "-DCMAKE_PREFIX_PATH=${prefix}")
if(LAUNCHER)
  list(APPEND configure_args "-DCMAKE_CXX_COMPILER_LAUNCHER=${LAUNCHER}")
endif()
run("configure examples/ with find_package(vdit)" "${CMAKE_COMMAND}" ${configure_args})
run("build examples/" "${CMAKE_COMMAND}" --build "${example_build}")

# LD_DEBUG=libs shows where the tokenizer's dlopen found libvdit_spm.so: it must be the installed
# one (through the run path the package adds), not the build tree's.
set(clip "${WORK_DIR}/clip/")  # a trailing slash: PNG frames, which need no FFmpeg
run("generate_clip on models/shapes, 2 steps" "${CMAKE_COMMAND}" -E env LD_DEBUG=libs
    "${example_build}/generate_clip" "${SOURCE_DIR}/models/shapes" "${clip}" --steps 2)
if(NOT EXISTS "${clip}frame_00009.png")
  message(FATAL_ERROR "install_and_consume: the example wrote no 9-frame clip at ${clip}:\n${step_output}")
endif()
string(FIND "${step_output}" "${prefix}/lib/libvdit_spm.so" found)
if(found EQUAL -1)
  message(FATAL_ERROR "install_and_consume: the example did not load ${prefix}/lib/libvdit_spm.so:\n${step_output}")
endif()
message(STATUS "install_and_consume: passed")
