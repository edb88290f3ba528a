from setuptools import find_packages, setup

setup(
    name="mobilevlm_ros",
    version="0.1.0",
    description="MobileVLM vision-language inference for ROS 2 robots",
    packages=find_packages(include=["mobilevlm_ros", "mobilevlm_ros.*"]),
    package_data={"mobilevlm_ros": ["demo_model/*", "demo_model/*/*"]},  # the bundled demo checkpoint
    python_requires=">=3.10",
    # torch 2.6: the int4 CPU kernels (model/quantize.py) are the _for_cpu ops 2.6 split out; 2.5 brought
    # torch.onnx.export's dynamo= keyword (engines/visual.py passes dynamo=False), 2.1 torch.load(mmap=True) and
    # load_state_dict(assign=True) (model/loader.py). Tested here with 2.13 only.
    # rosbags: mobilevlm replay-bag, mobilevlm demo and mobilevlm bag-to-dataset write and read ROS 2 bags.
    install_requires=["numpy", "pillow", "sentencepiece", "safetensors", "torch>=2.6", "rosbags"],
    extras_require={
        "test": ["pytest", "vermin", "onnx", "onnxruntime", "transformers", "peft"],
        "engines": ["onnx", "onnxruntime"],
        # llama-cpp-python 0.3.36: its chat handlers run on mtmd (bench/e2e.py reads the handler's mtmd context),
        # and its llama.cpp still loads MobileVLM's LDP / LDPv2 projectors (tools/mtmd/models/llava.cpp).
        "bench": ["onnx", "onnxruntime", "transformers", "llama-cpp-python>=0.3.36,<0.4", "gguf", "matplotlib"],
    },
    entry_points={
        "console_scripts": [
            "mobilevlm = mobilevlm_ros.cli.main:main",  # every command: mobilevlm ask, ..., mobilevlm dev bench
            "mobilevlm_node = mobilevlm_ros.node:main",  # the ROS 2 executables keep ROS's naming
            "mobilevlm_lifecycle_node = mobilevlm_ros.lifecycle_node:main",
        ],
    },
)
