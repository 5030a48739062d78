# Copyright: llmstack maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

# Private to the collection (the leading underscore): it can change at any time.
# The options match HTTP_COMMON_ARGS / http_argument_spec() in plugins/module_utils/_http.py.

from __future__ import annotations


class ModuleDocFragment:
    # Options of every module that talks to an inference server: llmstack.inference._http
    DOCUMENTATION = r"""
options:
  url:
    description:
      - Server base URL; a trailing C(/v1) is accepted.
      - With O(unix_socket), only its path is used (the host names the server in the C(Host) header).
    type: str
    default: http://127.0.0.1:5000
  timeout:
    description: Seconds allowed; what they cover is said by each module.
    type: int
  validate_certs:
    description: Verify the server's TLS certificate for an C(https) O(url).
    type: bool
    default: true
  ca_path:
    description:
      - PEM file of the CA certificates that verify the server, on the host the module runs on,
        for a server whose certificate the system CA store does not know.
    type: path
  client_cert:
    description:
      - PEM file of the client certificate sent for TLS client authentication (mutual TLS).
      - It may hold the private key too; otherwise give O(client_key).
    type: path
  client_key:
    description: PEM file of the private key of O(client_cert).
    type: path
  unix_socket:
    description: Path of a unix socket the server listens on, used instead of a TCP connection.
    type: path
  use_proxy:
    description:
      - Use the proxy of the environment (C(http_proxy), C(https_proxy), honouring C(no_proxy)),
        for a server reached only through a proxy.
      - Off by default because the servers are on the node or its LAN, and a proxy set for package
        downloads would receive their requests (C(no_proxy) takes no address ranges).
      - A loopback O(url) (C(localhost), C(127.0.0.0/8), C(::1)) and O(unix_socket) are always reached
        directly, since a proxy would not reach this host's own servers.
    type: bool
    default: false
notes:
  - HTTP runs on Ansible's own C(ansible.module_utils.urls), as in M(ansible.builtin.uri).
"""

    # The admin key of TabbyAPI's admin API: llmstack.inference._http.admin_key
    ADMIN_KEY = r"""
options:
  admin_key:
    description:
      - TabbyAPI admin key, sent as C(x-admin-key) and C(Authorization) C(Bearer).
      - Takes precedence over O(api_tokens_file).
    type: str
  api_tokens_file:
    description:
      - Path of TabbyAPI's C(api_tokens.yml) on the host the module runs on; its C(admin_key) is used
        when O(admin_key) is not given. A key read from it is hidden from the results and logs.
      - Without O(admin_key) and O(api_tokens_file), no key is sent (C(network.disable_auth=true)).
    type: path
"""

    # The API key of an OpenAI-compatible server: llmstack.inference._http.api_key
    API_KEY = r"""
options:
  api_key:
    description: API key. Takes precedence over O(api_tokens_file).
    type: str
  api_tokens_file:
    description:
      - TabbyAPI's C(api_tokens.yml) on the host the module runs on; its C(api_key) (the first one when
        it lists several) is used when O(api_key) is not given. A key read from it is hidden from the
        results and logs.
    type: path
"""
