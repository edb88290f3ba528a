"""The one home of every choice a user makes by name: backends, dtypes, quantisation modes, compile modes, camera
transports and reliabilities. Plain tuples with no imports, so the CLI, the node's parameters and the model code
all read the same lists without pulling in torch or ROS.
"""
from __future__ import annotations

# Vision encoder + projector: plain PyTorch, or an engine built from its ONNX export (engines/).
BACKENDS = ("torch", "onnxruntime", "tensorrt")
ENGINE_BACKENDS = BACKENDS[1:]
# Precision of a TensorRT engine (mobilevlm build-engines --precision); ONNX Runtime's engines are fp32.
ENGINE_PRECISIONS = ("fp16", "fp32")
# Weight and activation dtype of the model (float16 on CUDA only).
DTYPES = ("float32", "bfloat16", "float16")
# CPU weight quantisation of the decoder's Linear layers (model/quantize.py); "" is none.
QUANTIZE_MODES = ("int8", "int8-dynamic", "int4")
# "": the CUDA graphs replay the eager kernels; else the torch.compile mode that fuses them first (cuda_graph.py).
COMPILE_MODES = ("", "default", "max-autotune-no-cudagraphs")
# Camera intake: sensor_msgs/Image or sensor_msgs/CompressedImage.
TRANSPORTS = ("raw", "compressed")
# Camera subscription reliability: "auto" matches the publishers' (as `ros2 bag record` does).
RELIABILITIES = ("auto", "best_effort", "reliable")
# How a frame's age is judged: its header stamp against the node's clock, or its arrival time.
FRAME_AGE_SOURCES = ("stamp", "arrival")
