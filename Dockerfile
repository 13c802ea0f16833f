# mdistill on a CUDA PyTorch base image.
#   docker build -t mdistill .
#   docker run --gpus all --shm-size 8g -v $PWD/data:/work/data -v $PWD/output:/work/output \
#       mdistill python tools/train.py --cfg configs/cifar100/kd.yaml
FROM pytorch/pytorch:2.4.1-cuda12.4-cudnn9-runtime
WORKDIR /work
COPY pyproject.toml README.md ./
COPY mdistill ./mdistill
RUN pip install --no-cache-dir -e .
COPY configs ./configs
COPY tools ./tools
COPY scripts ./scripts
CMD ["python", "tools/train.py", "--help"]
