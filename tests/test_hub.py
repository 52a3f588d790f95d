"""The export's model card and `push_to_hub`, against a local stand-in of the Hub's HTTP API (127.0.0.1): the
endpoints `huggingface_hub.HfApi.create_repo` and `upload_folder` call (create, preupload, commit), files received
compared byte for byte with the export folder."""
import base64
import http.server
import json
import pathlib
import threading

import pytest

from ssft_jax import config as config_lib, hub


class _FakeHub(http.server.BaseHTTPRequestHandler):
    received: dict = {}
    requests: list = []

    def log_message(self, *args):
        pass

    def _reply(self, obj, code=200):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.requests.append((self.path, self.headers.get("authorization")))
        if self.path == "/api/repos/create":
            req = json.loads(data)
            self.received.setdefault("repos", []).append(req)
            return self._reply(
                {"url": f"http://{self.headers['Host']}/{req.get('organization') or 'me'}/{req['name']}"}
            )
        if self.path == "/api/validate-yaml":  # the model card's front matter (README.md in the commit)
            self.received["card_yaml"] = json.loads(data)
            return self._reply({"errors": [], "warnings": []})
        if "/preupload/" in self.path:  # every file goes as a regular git blob (no LFS/xet in the stand-in)
            files = json.loads(data)["files"]
            return self._reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                          for f in files]})
        if "/commit/" in self.path:
            for line in data.decode().splitlines():
                op = json.loads(line)
                if op["key"] == "file":
                    self.received.setdefault("files", {})[op["value"]["path"]] = base64.b64decode(
                        op["value"]["content"]
                    )
                elif op["key"] == "header":
                    self.received["summary"] = op["value"]["summary"]
            return self._reply({"commitUrl": f"http://{self.headers['Host']}/me/ssft-demo/commit/{'a' * 40}",
                                "commitOid": "a" * 40, "pullRequestUrl": None})
        return self._reply({"error": f"not in the stand-in: {self.path}"}, 404)


@pytest.fixture
def fake_hub(monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the suite runs offline; this server is local
    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)
    _FakeHub.received, _FakeHub.requests = {}, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _FakeHub
    server.shutdown()


def _export_folder(tmp_path) -> pathlib.Path:
    folder = tmp_path / "hf_export"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 10)
    (folder / "tokenizer.json").write_text("{}")
    return folder


def test_model_card_says_how_to_prompt_each_tag_and_the_run():
    c = config_lib.load_config("smollm2_gsm8k", "")
    c.model.hf_dir = "HuggingFaceTB/SmolLM2-135M-Instruct"
    summary = {"final_step": 20, "questions": 103, "losses": {"1": 1.5, "20": 0.6}, "tag_counts": [3, 0, 5, 4, 4, 0]}
    folder = pathlib.Path(config_lib.__file__).parent  # any existing folder works for the text; write to tmp below
    text = hub.model_card(base_model=c.model.hf_dir, method="ssft", num_tags=6, max_traces=4, cost_prefix_len=32,
                          tag_mode="text", summary=summary)
    assert (
        text.startswith("---\nlibrary_name: transformers") and "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in text
    )
    assert "L=32 tokens" in text and "N=6 tags, up to M=4 traces" in text and "forking_tag=k" in text
    assert "for k in range(1, 7):" in text and "| loss | 1.5000 -> 0.6000 |" in text
    assert "| traces matched per tag | 3 0 5 4 4 0 |" in text and folder.is_dir()
    scratch = hub.model_card(base_model="", method="sft_mixed", num_tags=6, max_traces=4, cost_prefix_len=32,
                             tag_mode="special", summary=None)
    assert "base_model" not in scratch and "SFT-mixed" in scratch and "one added token" in scratch


def test_push_to_hub_uploads_the_folder_to_the_stand_in(tmp_path, fake_hub):
    endpoint, server = fake_hub
    folder = _export_folder(tmp_path)
    c = config_lib.load_config("demo", "tiny")
    hub.write_model_card(folder, c, {"final_step": 6, "losses": {"1": 4.7, "6": 4.1}, "tag_counts": [1] * 6})
    url = hub.push_to_hub(folder, "me/ssft-demo", endpoint=endpoint, token="hf_test_token")
    assert url == f"{endpoint}/me/ssft-demo/commit/{'a' * 40}"
    assert (
        server.received["repos"][0]["name"] == "ssft-demo"
        and server.received["repos"][0].get("visibility") == "private"
    )
    assert server.received["files"] == {p.name: p.read_bytes() for p in folder.iterdir()}
    assert "README.md" in server.received["files"] and server.received["summary"] == "Upload SSFT export"
    assert "forking-tokens" in json.dumps(server.received["card_yaml"])  # the card's front matter was validated
    assert all(auth == "Bearer hf_test_token" for _, auth in server.requests)


def test_push_refuses_offline_mode_and_a_folder_that_is_no_export(tmp_path, monkeypatch):
    from huggingface_hub import constants
    folder = _export_folder(tmp_path)
    monkeypatch.setattr(constants, "is_offline_mode", lambda: True)
    with pytest.raises(hub.HubError, match="HF_HUB_OFFLINE is set"):
        hub.push_to_hub(folder, "me/x", endpoint="http://127.0.0.1:9")
    with pytest.raises(hub.HubError, match="not an HF export folder"):
        hub.push_to_hub(tmp_path, "me/x")
