# An S3-compatible server for machines that cannot pull MinIO: moto, on top of the locoswarm
# image (it reuses that image's Python and wheels, so it builds in seconds). Only for tests:
# moto keeps every object in memory and checks no credentials.
#   podman build -f docker/s3-moto.Dockerfile --build-arg LOCOSWARM_IMAGE=localhost/locoswarm:cpu \
#       -t localhost/locoswarm-s3 .
# then for docker/compose.yml: S3_IMAGE=localhost/locoswarm-s3 S3_COMMAND="-H 0.0.0.0 -p 9000"
ARG LOCOSWARM_IMAGE=localhost/locoswarm:cpu
FROM ${LOCOSWARM_IMAGE}
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_NO_INDEX=0
USER 0
COPY pyproject.toml docker/requirements.py /tmp/deps/
RUN --mount=type=bind,source=docker/wheels,target=/wheels \
    set -eu; \
    python3 /tmp/deps/requirements.py /tmp/deps/pyproject.toml s3server | grep -E '^moto' > /tmp/deps/moto.txt; \
    pip install --no-cache-dir --find-links /wheels -r /tmp/deps/moto.txt; \
    rm -rf /tmp/deps
USER 10001:10001
HEALTHCHECK NONE
EXPOSE 9000
ENTRYPOINT ["python", "-m", "moto.server"]
CMD ["-H", "0.0.0.0", "-p", "9000"]
