#include <iostream>
int main() { std::cout << "vdit\n"; return 0; }
