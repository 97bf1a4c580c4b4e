# syntax=docker/dockerfile:1
#
# nbdqcow in a container: a small image that serves disk images over NBD.
#
#   docker build -t nbdqcow .
#   docker run -d -p 10809:10809 -v "$PWD/images:/images" nbdqcow \
#       --bind 0.0.0.0 /images/disk.qcow2
#
# Arguments after the image name go to `nbdqcow serve`.  The default command
# serves /images/disk.qcow2 on all interfaces of the container, creating it
# (10 GiB, sparse qcow2) when absent, so the container works with nothing
# prepared; mount the directory holding your images on /images (the volume),
# owned by or writable for uid 10809 when exports are writable.  Recipes:
# docs/operations.md.

# --- build stage: wheels for nbdqcow and its dependencies ------------------
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY nbdqcow ./nbdqcow
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# --- runtime stage: the wheel and its dependencies, nothing else ------------
FROM python:3.11-slim
LABEL org.opencontainers.image.title="nbdqcow" \
      org.opencontainers.image.description="Pure-Python asyncio NBD server for qcow2 and raw images" \
      org.opencontainers.image.licenses="ISC"
# A fixed, unprivileged uid (10809, like the port) so that operators can
# chown the images volume to it.
RUN groupadd --system --gid 10809 nbdqcow \
    && useradd --system --uid 10809 --gid nbdqcow --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin nbdqcow \
    && mkdir /images && chown nbdqcow:nbdqcow /images
COPY --from=build /wheels /wheels
# --no-index: install exactly the wheels built above, nothing fetched here.
RUN pip install --no-cache-dir --no-index --find-links=/wheels /wheels/nbdqcow-*.whl \
    && rm -rf /wheels
VOLUME ["/images"]
WORKDIR /images
# Numeric, so that runtimes can check runAsNonRoot without reading /etc/passwd.
USER 10809:10809
EXPOSE 10809
# A real NBD handshake (NBD_OPT_LIST, then NBD_OPT_ABORT), not a TCP probe:
# a wedged server that still accepts connections is reported unhealthy.
HEALTHCHECK --interval=30s --timeout=10s --start-period=10s --retries=3 \
    CMD ["python", "-m", "nbdqcow.healthcheck", "--quiet", "--timeout", "5", "127.0.0.1:10809"]
ENTRYPOINT ["nbdqcow", "serve"]
CMD ["--bind", "0.0.0.0", "--create", "10G", "/images/disk.qcow2"]
