"""A moto S3 server on loopback for the tests that need object storage (no network, no real bucket)."""
import contextlib
import os
import socket


def aws_env(key_id: str, secret: str) -> dict:
    """Credentials for moto, and no config file, profile or instance metadata that could leak in."""
    return {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": "/nonexistent/aws-config", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-creds",
            "AWS_EC2_METADATA_DISABLED": "true"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server(env: dict):
    """Start the server, point this process's environment (inherited by subprocesses) at it with ``env``'s
    credentials, yield its endpoint URL; restore the environment and stop the server after."""
    import s3fs
    from moto import server as moto

    saved = {k: os.environ.get(k) for k in [*env, "AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN"]}
    server = moto.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(env)
    os.environ["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(k, None)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield os.environ["AWS_ENDPOINT_URL"]
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
