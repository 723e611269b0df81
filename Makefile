# mixln: Mix-LN LLaMA training engine.
#   make            build ./train (nvcc when it is installed, else g++, CPU backend either way)
#   make test       build and run every test (generates the PyTorch fixtures first)
#   make demo       the King James Bible -> a trained Mix-LN model -> generated text, in a few minutes
#   make bench      time a training step of the CPU backend against PyTorch eager
# CUDA_ARCHS sets the GPU targets (there is no GPU here to detect them from).

NVCC ?= $(shell command -v nvcc 2>/dev/null)
CXX ?= g++
CUDA_ARCHS ?= 80 90
# PYTHON: an interpreter with torch (the Debian python3-torch package installs it for /usr/bin/python3)
PYTHON ?= $(shell for p in python3 /usr/bin/python3; do $$p -c 'import torch' 2>/dev/null && echo $$p && break; done)

# CATCH_INCLUDE: a folder holding catch2/catch.hpp, where the system has none (the device machine)
CATCH_INCLUDE ?=
WARNINGS = -Wall -Wextra -Werror
CXXFLAGS ?= -O3 -march=native -mprefer-vector-width=512
# -fno-math-errno: nothing here reads errno after a math function (only after strtol/strtod, which
# it leaves alone), and a sqrt that may set errno is a call the compiler cannot vectorise around
# (the CPU AdamW ran 4x slower for it); the results are the same IEEE values
CXXFLAGS += -std=c++17 -fopenmp -fno-math-errno $(WARNINGS) $(if $(CATCH_INCLUDE),-I$(CATCH_INCLUDE))
NVCCFLAGS = -std=c++17 -O3 $(foreach a,$(CUDA_ARCHS),-gencode arch=compute_$(a),code=sm_$(a)) \
            -Werror all-warnings -Xcompiler -fopenmp,-fno-math-errno,-march=native,-mprefer-vector-width=512,-Wall,-Wextra,-Werror \
            $(if $(CATCH_INCLUDE),-I$(CATCH_INCLUDE))

CUDA_HOME ?= /usr/local/cuda
HEADERS = $(wildcard *.h layers/*.cuh test/emu/*.h test/*.h)
TEST_SOURCES = $(filter-out test/test_main.cpp test/test_finite_difference.cpp test/test_cuda_emu.cpp,$(wildcard test/*.cpp))

.PHONY: all test sanitize bench demo kernel-report clean
all: train

ifneq ($(NVCC),)
train: train.cu $(HEADERS)
	$(NVCC) $(NVCCFLAGS) train.cu -o $@ -lgomp -lcublasLt
else
train: train.cu $(HEADERS)
	@echo "nvcc not found: building the CPU-only train with $(CXX)"
	$(CXX) $(CXXFLAGS) -x c++ train.cu -o $@
endif

# the g++-only build that `make` falls back to without nvcc, built by the tests so it keeps compiling
build/train_cpu: train.cu $(HEADERS)
	@mkdir -p build
	$(CXX) $(CXXFLAGS) -x c++ train.cu -o $@

# the CPU kernels that a step's time hangs on (GEMM, AdamW, gradient norm), timed alone; built by
# the tests so it keeps compiling. Run: OMP_NUM_THREADS=2 ./build/bench_cpu_kernels
build/bench_cpu_kernels: dev/bench_cpu_kernels.cpp $(HEADERS)
	@mkdir -p build
	$(CXX) $(CXXFLAGS) dev/bench_cpu_kernels.cpp -o $@

build/test_main.o: test/test_main.cpp
	@mkdir -p build
	$(CXX) -std=c++17 -O1 $(if $(CATCH_INCLUDE),-I$(CATCH_INCLUDE)) -c $< -o $@

build/test_cpu: $(TEST_SOURCES) build/test_main.o $(HEADERS) test/test_util.h
	$(CXX) $(CXXFLAGS) -I. $(TEST_SOURCES) build/test_main.o -o $@

# the CPU backend in double precision, for the finite-difference gradient check
build/test_fd: test/test_finite_difference.cpp build/test_main.o $(HEADERS) test/test_util.h
	$(CXX) $(CXXFLAGS) -DMIXLN_REAL_DOUBLE -I. test/test_finite_difference.cpp build/test_main.o -o $@

# ./train with the CUDA backend under the CPU emulation of CUDA: the CLI tests run --device cuda
# and the bf16 precisions through it (test/test_train_cli.cpp)
build/train_emu: train.cu $(HEADERS)
	@mkdir -p build
	$(CXX) $(CXXFLAGS) -DMIXLN_CUDA_EMULATION -I$(CUDA_HOME)/include -x c++ train.cu -o $@

NEED_TORCH = @test -n "$(PYTHON)" || { echo "error: no python with torch found (see README: Testing)"; exit 1; }

# the CUDA kernels run on the CPU through the emulation of CUDA in test/emu (see cuda_common.h)
EMU_FLAGS = -DMIXLN_CUDA_EMULATION -I$(CUDA_HOME)/include
BF16_KERNEL_TESTS = $(wildcard test/test_kernels_bf16_*.cu)
EMU_SOURCES = test/test_kernels.cu $(BF16_KERNEL_TESTS) test/test_cuda_emu.cpp test/test_model.cpp
# one object per source, so that `make -j` compiles them side by side
EMU_OBJECTS = $(patsubst test/%,build/emu/%.o,$(EMU_SOURCES))
build/emu/%.o: test/% $(HEADERS)
	@mkdir -p build/emu
	$(CXX) $(CXXFLAGS) $(EMU_FLAGS) -I. -x c++ -c $< -o $@
build/test_emu: $(EMU_OBJECTS) build/test_main.o
	$(CXX) $(CXXFLAGS) $(EMU_OBJECTS) build/test_main.o -o $@

# the same kernel tests on a real GPU; without one the binary says so and runs nothing
ifneq ($(NVCC),)
GPU_TESTS = build/test_gpu
GPU_OBJECTS = $(patsubst test/%,build/gpu/%.o,test/test_kernels.cu $(BF16_KERNEL_TESTS) test/test_gpu_main.cu test/test_model.cpp)
build/gpu/%.o: test/% $(HEADERS)
	@mkdir -p build/gpu
	$(NVCC) $(NVCCFLAGS) -I. -x cu -c $< -o $@
build/test_gpu: $(GPU_OBJECTS)
	$(NVCC) $(NVCCFLAGS) $(GPU_OBJECTS) -o $@ -lgomp -lcublasLt
endif

build/fixtures/done: dev/reference.py dev/make_fixtures.py
	$(NEED_TORCH)
	$(PYTHON) dev/make_fixtures.py --out build/fixtures
	@touch $@

test: train build/train_cpu build/bench_cpu_kernels build/train_emu build/test_cpu build/test_fd build/test_emu $(GPU_TESTS) build/fixtures/done
	$(PYTHON) dev/test_reference.py
	$(PYTHON) dev/data/test_prepare.py
	$(PYTHON) dev/test_sweep.py
	MIXLN_FIXTURES=build/fixtures MIXLN_TRAIN=./train MIXLN_TRAIN_EMU=build/train_emu PYTHON=$(PYTHON) ./build/test_cpu
	./build/test_fd
	MIXLN_FIXTURES=build/fixtures ./build/test_emu
	$(if $(GPU_TESTS),MIXLN_FIXTURES=build/fixtures ./build/test_gpu)

# AddressSanitizer and UndefinedBehaviorSanitizer builds: the CPU tests, ./train's CPU backend and
# its CUDA backend under the emulation (which the CLI tests run), and the CUDA kernels' tests under
# the emulation, where ASan reports a kernel's access outside its cudaMalloc allocation
# (test/emu/cuda_emu.h), and the model's activation tensors are fenced off by poisoned redzones
# (model.h). UBSan with float-cast-overflow, which gcc leaves out of "undefined". -O1 keeps them
# quick to build; -Wno-maybe-uninitialized because gcc 12 warns inside libstdc++'s <regex> under
# the sanitizers.
#   make sanitize        build them and run the tests (the CLI tests included: ~11 min on 2 cores)
SAN_FLAGS = -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined,float-cast-overflow -fno-sanitize-recover=all
SAN_CXXFLAGS = -march=native -std=c++17 -fopenmp -fno-math-errno $(WARNINGS) -Wno-maybe-uninitialized $(SAN_FLAGS) \
               $(if $(CATCH_INCLUDE),-I$(CATCH_INCLUDE))
build/san/train_cpu: train.cu $(HEADERS)
	@mkdir -p build/san
	$(CXX) $(SAN_CXXFLAGS) -x c++ train.cu -o $@
build/san/train_emu: train.cu $(HEADERS)
	@mkdir -p build/san
	$(CXX) $(SAN_CXXFLAGS) $(EMU_FLAGS) -x c++ train.cu -o $@
build/san/test_main.o: test/test_main.cpp
	@mkdir -p build/san
	$(CXX) $(SAN_CXXFLAGS) -c $< -o $@
build/san/test_cpu: $(TEST_SOURCES) build/san/test_main.o $(HEADERS) test/test_util.h
	$(CXX) $(SAN_CXXFLAGS) -I. $(TEST_SOURCES) build/san/test_main.o -o $@
SAN_EMU_OBJECTS = $(patsubst test/%,build/san/emu/%.o,$(EMU_SOURCES))
build/san/emu/%.o: test/% $(HEADERS)
	@mkdir -p build/san/emu
	$(CXX) $(SAN_CXXFLAGS) $(EMU_FLAGS) -I. -x c++ -c $< -o $@
build/san/test_emu: $(SAN_EMU_OBJECTS) build/san/test_main.o
	$(CXX) $(SAN_CXXFLAGS) $(SAN_EMU_OBJECTS) build/san/test_main.o -o $@

sanitize: build/san/train_cpu build/san/train_emu build/san/test_cpu build/san/test_emu build/fixtures/done
	MIXLN_FIXTURES=build/fixtures MIXLN_TRAIN=build/san/train_cpu MIXLN_TRAIN_EMU=build/san/train_emu PYTHON=$(PYTHON) \
	    ./build/san/test_cpu
	MIXLN_FIXTURES=build/fixtures ./build/san/test_emu

# the compiler's register and spill report for every kernel, per target architecture
kernel-report:
	@test -n "$(NVCC)" || { echo "error: kernel-report needs nvcc"; exit 1; }
	@$(NVCC) $(NVCCFLAGS) -Xptxas -v -c train.cu -o /dev/null 2>&1 | c++filt | \
	    sed -n -e "s/.*Compiling entry function '\(.*\)' for '\(sm_[0-9]*\)'.*/\2  \1/p" -e 's/.*ptxas info *: *\(Used .*\)/      \1/p' \
	    -e 's/^ *\([0-9][0-9]* bytes stack frame.*\)/      \1/p'

# text to a trained Mix-LN model and its samples, in one command (a few minutes on 2 cores)
demo:
	bash dev/demo.sh

bench: train
	$(NEED_TORCH)
	$(PYTHON) dev/bench_cpu.py

clean:
	rm -rf train build
