"""What a spawner needs of JupyterHub's user object, for tests that render
job scripts without a hub."""


class StubUser:
    def __init__(self, name):
        self.name = name
        self.escaped_name = name
        self.url = self.base_url = f"/user/{name}/"
        self.orm_user = None
