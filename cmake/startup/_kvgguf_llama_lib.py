"""Run at interpreter start-up by kvgguf.pth (both installed beside the kvgguf package): points
llama-cpp-python at kvgguf's patched libllama, so that ``import llama_cpp`` loads it also when it comes before
``import kvgguf`` (existing llama-cpp-python code, ``python -m llama_cpp.server``). An LLAMA_CPP_LIB_PATH set by
the user is left as it is. Kept tiny: it must not import kvgguf or llama_cpp."""
import os

_LIB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kvgguf", "lib")
if os.path.isdir(_LIB_DIR):
    os.environ.setdefault("LLAMA_CPP_LIB_PATH", _LIB_DIR)
