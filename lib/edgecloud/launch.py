"""Build the edge and cloud servers from the configuration (used by start_edge.py, start_cloud.py, edge_cloud.py)."""
from __future__ import annotations

from lib.edgecloud.confidence import make_calculator
from lib.edgecloud.http_api import ServerThread, create_cloud_app, create_edge_app, listen_socket
from lib.edgecloud.settings import cloud_model_dir, edge_gguf_path, tokenizer_dir


def build_edge_app(cfg: dict):
    from lib.edgecloud.draft import EdgeDrafter
    from lib.models import load_tokenizer
    edge = cfg["edge"]
    conf = edge["confidence"]
    calculator = make_calculator(conf["strategy"], conf["weights"], top_k=int(conf["top_k"]))
    gguf_path = edge_gguf_path(cfg)
    eos = load_tokenizer(tokenizer_dir(cfg)).eos_token_id
    drafter = EdgeDrafter(gguf_path, calculator, eos_ids={eos}, n_ctx=int(edge["model"]["context_length"]),
                          n_threads=int(edge["model"]["n_threads"]), cache_size=int(edge["kv_cache"]["max_size"]),
                          seed=int(cfg["inference"]["seed"]), label=f"edge model {gguf_path}")
    import llama_cpp
    describe = {"model": gguf_path.name, "engine": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})",
                "confidence": conf["strategy"]}
    comm = cfg["communication"]
    return create_edge_app(drafter, comm["auth_token"], int(comm["max_body_bytes"]), describe), drafter


def build_cloud_app(cfg: dict):
    import torch
    cloud = cfg["cloud"]
    target = cloud_model_dir(cfg)
    if cloud["model"]["n_threads"]:
        torch.set_num_threads(int(cloud["model"]["n_threads"]))
    if cloud["model"]["engine"] == "vllm":
        from lib.edgecloud.verify_vllm import VLLMCloudVerifier
        verifier = VLLMCloudVerifier(target, cloud["model"]["dtype"], seed=int(cfg["inference"]["seed"]))
        describe = {"model": target.name, "engine": f"vllm {verifier.vllm.__version__}", "device": verifier.device}
    else:
        from lib.edgecloud.verify import CloudVerifier
        verifier = CloudVerifier(target, "cuda" if torch.cuda.is_available() else "cpu", cloud["model"]["dtype"],
                                 int(cloud["kv_cache"]["block_size"]), int(cloud["kv_cache"]["max_blocks"]),
                                 seed=int(cfg["inference"]["seed"]))
        describe = {"model": target.name, "engine": "hf (PyTorch/transformers)", "device": verifier.device}
    comm = cfg["communication"]
    return create_cloud_app(verifier, comm["auth_token"], int(comm["max_body_bytes"]), describe), verifier


def start_in_threads(cfg: dict) -> list[ServerThread]:
    """Both servers in this process (edge_cloud.py --mode server/ablation and the tests). Both addresses are bound
    first, so a busy port is reported before any model loads."""
    roles = ("edge", "cloud")
    sockets, threads = [], []
    try:
        for role in roles:
            server = cfg[role]["server"]
            sockets.append(listen_socket(server["host"], int(server["port"]), f"{role}.server.host/port"))
        apps = [build_edge_app(cfg)[0], build_cloud_app(cfg)[0]]
        for role, app, sock in zip(roles, apps, sockets):
            server = cfg[role]["server"]
            threads.append(ServerThread(app, server["host"], int(server["port"]), sock).start())
    except BaseException:
        for t in threads:
            t.stop()
        for sock in sockets:
            sock.close()
        raise
    return threads
